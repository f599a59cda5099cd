"""Read a running cifar-serve's model configuration and statistics with Triton's own client; print JSON.

tests/test_model_config.py runs this in a process of its own (tritonclient's protos and
cifar-serve's register the same "inference.*" symbols; one process cannot hold both). Between
two statistics reads it sends the requests listed in REQUESTS (images per request), so the test
can compare the counts with what was sent.

usage: python tests/triton_stats_check.py ADDRESS MODEL IMAGES.npy
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 60.0
# Images per request: singles, small batches, and one larger than the test server's batch of 8.
REQUESTS = (1, 1, 1, 1, 1, 4, 4, 4, 20)


def main(argv: list[str]) -> int:
    address, model, images_path = argv
    images = np.load(images_path)
    out: dict[str, Any] = {"requests": list(REQUESTS)}
    client = grpcclient.InferenceServerClient(address)
    try:
        out["config"] = client.get_model_config(model, as_json=True)
        out["server_metadata"] = client.get_server_metadata(as_json=True)
        out["stats_before"] = client.get_inference_statistics(model, as_json=True)
        pos = 0
        for n in REQUESTS:
            x = images[pos : pos + n]
            pos += n
            inp = grpcclient.InferInput("images", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            client.infer(model, [inp], client_timeout=TIMEOUT_S)
        # A malformed request fails validation before it reaches the model: not an inference.
        bad = grpcclient.InferInput("images", [1, 32, 32, 3], "FP32")
        bad.set_data_from_numpy(images[:1].astype(np.float32))
        try:
            client.infer(model, [bad], client_timeout=TIMEOUT_S)
        except InferenceServerException as exc:
            out["bad_request"] = str(exc.status())
        out["stats_after"] = client.get_inference_statistics(model, as_json=True)
        out["stats_all"] = client.get_inference_statistics("", as_json=True)
        try:
            client.get_inference_statistics("no_such_model")
        except InferenceServerException as exc:
            out["unknown_model"] = str(exc.status())
        try:
            client.get_model_config("no_such_model")
        except InferenceServerException as exc:
            out["unknown_model_config"] = str(exc.status())
    finally:
        client.close()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
