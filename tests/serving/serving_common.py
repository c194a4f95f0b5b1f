"""Names shared by the serving tests and their conftest."""
API_KEY = "sk-test-mosaicjax"
LM_NAME, IMAGE_NAME = "tiny-dbrx", "tiny-sd"
