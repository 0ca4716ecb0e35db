"""What every trainer image promises: `train` as its command, a non-root user, ffmpeg inside."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.docker


@pytest.mark.timeout(3600)  # may include cold builds
@pytest.mark.parametrize("fixture", ["audio_image", "keras_image", "test_image"])
def test_image_contract(fixture, request, docker_client):
    image = request.getfixturevalue(fixture)
    config = docker_client.images.get(image).attrs["Config"]
    assert config["Cmd"] == ["train"]
    assert config["User"] and config["User"].split(":")[0] not in ("0", "root"), config["User"]
    out = docker_client.containers.run(
        image, ["sh", "-c", "id -u; command -v train; ffmpeg -hide_banner -version | head -1"],
        network_mode="none", remove=True, read_only=True,
    ).decode().split("\n")
    assert out[0] != "0"
    assert out[1].endswith("/train")
    assert out[2].startswith("ffmpeg version"), out
