"""Many clients through the official `openai` SDK against a Kino API node (tests/scaleout.rs).

KINO_BASE_URL: the API node; KINO_JOBS (default 200) videos from KINO_CLIENTS (default 20)
threads. Each client creates its videos, polls them until they end (riding out the API node's
restart: connection errors are retried) and downloads each MP4 once to $KINO_OUT/<id>.mp4.
Prints one JSON line: {"ids": [...], "failed": [...], "seconds": S}; exits non-zero on a
failed check.
"""

import json
import os
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import openai  # noqa: E402

BASE_URL = os.environ["KINO_BASE_URL"]
JOBS = int(os.environ.get("KINO_JOBS", "200"))
CLIENTS = int(os.environ.get("KINO_CLIENTS", "20"))
OUT = os.environ["KINO_OUT"]
STEPS = int(os.environ.get("KINO_STEPS", "2"))
DEADLINE = time.time() + float(os.environ.get("KINO_TIMEOUT", "1500"))


def client():
    return openai.OpenAI(base_url=BASE_URL, api_key="kino-test", max_retries=0, timeout=60)


def retry(fn):
    """Calls fn until it answers: the API node may be restarting."""
    while True:
        try:
            return fn()
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as e:
            if time.time() > DEADLINE:
                raise
            print(f"retrying after {type(e).__name__}", file=sys.stderr)
            time.sleep(0.5)


lock = threading.Lock()
ids, failed, errors = [], [], []


def worker(k):
    c = client()
    mine = []
    try:
        for i in range(k, JOBS, CLIENTS):
            # A create that died with the API node may or may not have been stored; the test
            # counts rows, so a create is never retried blindly: only connection errors before
            # a response are retried, and the API node stores before it answers.
            v = retry(lambda: c.videos.create(model="sora-2", prompt=f"client {k} video {i}", seconds="1",
                                              extra_body={"steps": STEPS, "seed": i}))
            mine.append(v.id)
        pending = list(mine)
        while pending:
            if time.time() > DEADLINE:
                raise AssertionError(f"client {k}: {len(pending)} videos not done in time")
            left = []
            for vid in pending:
                v = retry(lambda: c.videos.retrieve(vid))
                if v.status == "completed":
                    data = retry(lambda: c.videos.download_content(vid).read())
                    with open(os.path.join(OUT, vid + ".mp4"), "wb") as f:
                        f.write(data)
                elif v.status == "failed":
                    with lock:
                        failed.append({"id": vid, "error": str(v.error)})
                else:
                    left.append(vid)
            pending = left
            if pending:
                time.sleep(0.3)
        with lock:
            ids.extend(mine)
    except Exception as e:  # noqa: BLE001
        with lock:
            errors.append(f"client {k}: {type(e).__name__}: {e}")


t0 = time.time()
threads = [threading.Thread(target=worker, args=(k,)) for k in range(CLIENTS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"ids": ids, "failed": failed, "errors": errors, "seconds": time.time() - t0}))
sys.exit(1 if errors or failed else 0)
