"""Text-to-image latency: mosaicjax's ImagePipeline side by side with diffusers on the same folder and request.

    python benchmarks/image_latency.py --config=small --size=256x256 --batch=1 --steps=10 --scheduler=euler
    python benchmarks/image_latency.py --folder=/path/to/diffusers_folder --size=512x512 --steps=20

Without --folder, a random diffusers folder of the chosen --config ('tiny': test-sized; 'small': SD-shaped with
narrow channels, ~50M parameters) is built with diffusers' and transformers' own classes. Both pipelines get the
same prompts, negative prompts, initial latents, scheduler, steps and guidance, float32. Timings are wall-clock
per request (text encoding + denoising + VAE decode, images back on the host), after warm-up: ours excludes the
one-time compile (reported separately); diffusers runs eagerly. Each side runs in its own fresh process;
--rounds=N alternates them N times and reports the median of the per-round ratios. The images are compared as a
sanity check.
Prints a table and one JSON line (`image_latency: {...}`) for the records.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import without_flags  # noqa: E402  (after the path line: also runs as a script)

CONFIGS = {
    # name: (text hidden, text layers, unet kwargs, vae block_out_channels)
    "tiny": (32, 2, dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
             (16, 32)),
    "small": (256, 4, dict(block_out_channels=(64, 128, 256), layers_per_block=2, attention_head_dim=8,
                           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                           norm_num_groups=32),
              (32, 64, 128, 128)),
}
CORPUS = ["a photo of an astronaut riding a horse on the moon", "a painting of a fox in the snow, detailed",
          "blurry, low quality, watermark, text", "portrait of a woman, studio lighting, bokeh"] * 3
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                     "dpmpp_2m": "DPMSolverMultistepScheduler"}


def build_folder(path: str, config: str, seed: int = 0) -> str:
    """A random SD1-style diffusers folder (safetensors) of the given size."""
    import diffusers
    import torch
    import transformers

    from mosaicjax.data import clip_tokenizer as ct
    hidden, layers, unet_kw, vae_channels = CONFIGS[config]
    merges = ct.train_clip_bpe(CORPUS, 100)
    vocab = ct.build_clip_vocab(merges)
    tok_dir = os.path.join(tempfile.mkdtemp(), "tokenizer")
    ct.CLIPTokenizer(vocab, merges).save_pretrained(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 4), max_position_embeddings=77, bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4,
                                          cross_attention_dim=hidden, **unet_kw)
    n = len(vae_channels)
    vae = diffusers.AutoencoderKL(block_out_channels=vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=min(32, vae_channels[0]))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tokenizer,
                                             unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls of fn, and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _request(args, latent_channels: int, factor: int):
    from mosaicjax.diffusion import pipeline as pipeline_lib
    width, height = pipeline_lib.parse_size(args.size)
    request = dict(prompt=[CORPUS[i % 4] for i in range(args.batch)],
                   negative_prompt=["blurry, low quality"] * args.batch, height=height, width=width,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    latents = np.random.default_rng(0).standard_normal(
        (args.batch, latent_channels, height // factor, width // factor)).astype(np.float32)
    return request, latents


def run_ours(args, folder: str) -> dict:
    """mosaicjax's pipeline in this process: load, compile (first call), warm-up, timed repeats."""
    from mosaicjax.diffusion import pipeline as pipeline_lib
    t0 = time.perf_counter()
    ours = pipeline_lib.load_image_pipeline(folder)
    load_s = time.perf_counter() - t0
    request, latents = _request(args, ours.unet_config.in_channels, ours.vae_scale_factor)
    run = lambda: ours(**request, latents=latents, scheduler=args.scheduler, output_type="np")  # noqa: E731
    t0 = time.perf_counter()
    run()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        run()
    times, image = _timed(run, args.repeats)
    return dict(times=times, image=image, first_call_s=first_s, load_s=load_s,
                compile_s=ours.last_timings.get("compile_s", float("nan")), text_s=ours.last_timings["text_s"])


def run_diffusers(args, folder: str) -> dict:
    """diffusers' StableDiffusionPipeline in this process on the same request: warm-up, timed repeats."""
    import diffusers
    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ref.scheduler = getattr(diffusers, SCHEDULER_CLASSES[args.scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    factor = 2 ** (len(ref.vae.config.block_out_channels) - 1)
    request, latents = _request(args, ref.unet.config.in_channels, factor)

    def run():
        with torch.no_grad():
            return ref(**request, latents=torch.from_numpy(latents), output_type="np").images

    for _ in range(args.warmup):
        run()
    times, image = _timed(run, args.repeats)
    return dict(times=times, image=image, torch_threads=torch.get_num_threads())


def _run_in_child(argv, side: str, folder: str, out_dir: str) -> dict:
    out = os.path.join(out_dir, side)
    subprocess.run([sys.executable, "-m", "benchmarks.image_latency", *argv, f"--folder={folder}",
                    f"--only={side}", f"--out={out}"], check=True, cwd=ROOT)
    result = json.load(open(out + ".json"))
    result["image"] = np.load(out + ".npy")
    return result


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="diffusers folder to load (default: build a random one)")
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    parser.add_argument("--batch", type=int, default=1, help="prompts per request")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="euler", choices=sorted(SCHEDULER_CLASSES))
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per side per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the sides (each in a fresh process) this many times; median ratio")
    parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--skip_diffusers", action="store_true")
    parser.add_argument("--only", choices=("ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)  # --only's results: OUT.json, OUT.npy
    args = parser.parse_args(argv)

    if args.only:  # one side, in this process (what the parent runs in a fresh child per side and round)
        result = (run_ours if args.only == "ours" else run_diffusers)(args, args.folder)
        np.save(args.out + ".npy", result.pop("image"))
        json.dump(result, open(args.out + ".json", "w"))
        return result

    folder = args.folder or build_folder(os.path.join(tempfile.mkdtemp(), args.config), args.config)
    # Each side in its own fresh process, as each runs in deployment (with the two interleaved in one process,
    # diffusers ran ~20% slower than on its own), alternating over rounds so a machine whose speed drifts slows
    # both alike.
    passthrough = without_flags(argv, ("--folder", "--rounds", "--json", "--only", "--out"))
    sides = ("ours",) if args.skip_diffusers else ("ours", "diffusers")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            rounds.append({side: _run_in_child(passthrough, side, folder, tmp) for side in sides})
    from mosaicjax.diffusion import pipeline as pipeline_lib
    width, height = pipeline_lib.parse_size(args.size)
    ours_all = [t for r in rounds for t in r["ours"]["times"]]
    first = rounds[0]["ours"]
    result = dict(config=args.folder or args.config, size=f"{width}x{height}", batch=args.batch, steps=args.steps,
                  scheduler=args.scheduler, rounds=args.rounds, ours_s=round(statistics.median(ours_all), 4),
                  ours_first_call_s=round(first["first_call_s"], 2), ours_compile_s=round(first["compile_s"], 2),
                  ours_load_s=round(first["load_s"], 2), ours_text_s=round(first["text_s"], 4))
    print(f"\n{'':12s}{'median s/request':>18s}   all runs (round by round)")
    print(f"{'mosaicjax':12s}{result['ours_s']:18.4f}   {', '.join(f'{t:.3f}' for t in ours_all)}"
          f"   (first call {first['first_call_s']:.2f}s incl. compile {first['compile_s']:.2f}s)")
    if not args.skip_diffusers:
        ref_all = [t for r in rounds for t in r["diffusers"]["times"]]
        ratios = [statistics.median(r["diffusers"]["times"]) / statistics.median(r["ours"]["times"]) for r in rounds]
        result.update(diffusers_s=round(statistics.median(ref_all), 4), speedup=round(statistics.median(ratios), 2),
                      round_speedups=[round(x, 2) for x in ratios],
                      torch_threads=rounds[0]["diffusers"]["torch_threads"],
                      max_abs_image_diff=float(np.abs(first["image"] - rounds[0]["diffusers"]["image"]).max()))
        print(f"{'diffusers':12s}{result['diffusers_s']:18.4f}   {', '.join(f'{t:.3f}' for t in ref_all)}")
        print(f"speedup {result['speedup']:.2f}x (median of rounds: {result['round_speedups']}), "
              f"max |image diff| {result['max_abs_image_diff']:.2e}")
    print("image_latency: " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
