from __future__ import annotations

import base64
import io

from PIL import Image

from channels.adapters import get_adapter
from openopen8.core.errors import InvalidRequest
from tests.adapters import png_input, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import make_channel


class PlaceholderAdapterTests(ApiTestCase):
    def test_it_renders_pngs_of_the_requested_size_without_a_provider(self) -> None:
        make_channel(kind="placeholder", base_url="", api_key="")
        r = self.generate({"model": "dall-e-2", "prompt": "a fox in the snow", "n": 2, "size": "512x512",
                           "response_format": "b64_json"})
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
        self.assertEqual([(i.format, i.size) for i in images], [("PNG", (512, 512))] * 2)
        self.assertNotEqual(images[0].tobytes(), images[1].tobytes())  # each is numbered

    def test_it_draws_the_default_size_for_auto(self) -> None:
        make_channel(kind="placeholder", models="gpt-image-1.5")
        r = self.generate({"model": "gpt-image-1.5", "prompt": "a fox"})
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        self.assertEqual(image.size, (1024, 1024))

    def test_it_refuses_sizes_it_will_not_draw(self) -> None:
        make_channel(kind="placeholder", models="*")
        assert_openai_error(self.generate({"model": "any", "prompt": "a", "size": "9000x9000"}), 400,
                            "invalid_request_error", param="size")
        assert_openai_error(self.generate({"model": "any", "prompt": "a", "size": "wide"}), 400,
                            "invalid_request_error", param="size")


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_needs_no_provider_and_draws_the_requested_size() -> None:
    adapter = get_adapter("placeholder")
    upstream = adapter.build_request(request(model="dall-e-2", size="512x512", n=2), target("placeholder"))
    assert upstream.json == {"prompt": "a red fox", "n": 2, "width": 512, "height": 512}
    assert adapter.build_probe(target("placeholder")) is None
    edit = adapter.build_request(request("edits", model="any", images=(png_input(64, 48),)),
                                 target("placeholder"))
    assert edit.json is not None and (edit.json["width"], edit.json["height"]) == (64, 48)


def test_it_refuses_sizes_beyond_what_it_draws() -> None:
    try:
        get_adapter("placeholder").build_request(request(model="any", size="9000x9000"), target("placeholder"))
    except InvalidRequest as error:
        assert error.param == "size"
    else:
        raise AssertionError("a huge size was accepted")
