"""A Google Cloud Storage emulator on localhost for tests: `python tests/gcs_emulator.py [PORT]`,
which prints the port it serves on once it does (without PORT, or 0: a free one the kernel picks).

gcp-storage-emulator (pure Python), in memory, with the bucket `bucket`, and two things its
downloads lack added here:
- the `x-goog-generation` header, which tensorstore reads to make its next write of an object
  conditional on it (how orbax's OCDBT manifests are rewritten); without it the second write of a
  manifest fails with "Malformed StorageGeneration";
- suffix ranges (`Range: bytes=-N`, the last N bytes), with which array_record reads a file's
  footer; the emulator answers them with the whole file, which it then cannot parse.
"""

import re
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

BUCKET = "bucket"
plain_download = objects.download


def complete_download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    try:
        response["x-goog-generation"] = storage.get_file_obj(bucket, name)["generation"]
        _suffix_range_as_absolute(request, len(storage.get_file(bucket, name)))
    except NotFound:
        pass  # the plain download answers 404
    plain_download(request, response, storage, *args, **kwargs)


def _suffix_range_as_absolute(request, size: int) -> None:
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range") or "")
    if not suffix:
        return
    absolute = f"bytes={max(0, size - int(suffix[1]))}-"
    plain_get_header = request.get_header
    request.get_header = lambda key, default=None: absolute if key.lower() == "range" else plain_get_header(key, default)


def serve(port: int) -> None:
    objects.download = complete_download
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is plain_download:
                handlers[method] = complete_download
    # The server's own start() waits forever when its thread fails to bind.
    api = server.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)._api
    api.start()
    while not api.is_running.wait(timeout=0.1):
        if not api.is_alive():
            sys.exit(f"the emulator could not serve on localhost:{port}")
    print(api._httpd.server_address[1], flush=True)  # bound and listening
    while True:
        time.sleep(60)


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
