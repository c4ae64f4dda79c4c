"""Fixture: the tiny model behind a real, token-protected uvicorn server on 127.0.0.1."""

import pytest

from harness import TOKEN, running_server


@pytest.fixture(scope="module")
def engine_server(tiny_model):
    """The tiny model behind a token-protected server (module-scoped: started once)."""
    from MedicalSAM3Core.serving.app import ServerConfig
    from MedicalSAM3Core.serving.serve import engine_runner, model_info

    with running_server(engine_runner(tiny_model), ServerConfig(token=TOKEN), info=model_info(tiny_model)) as (url, app):
        yield url, app
