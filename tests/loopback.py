"""The HTTP plumbing the loopback stand-ins share (tests/k8s_fake_api.py, tests/kfp_fake_api.py).

A ThreadingHTTPServer on 127.0.0.1 at a free port, served from a daemon thread, that stops by itself after
`lifetime` seconds (so a test that forgets it cannot leave it running) and can be stopped from any thread,
a request handler's included.
"""

import threading
from http.server import ThreadingHTTPServer


class LoopbackServer:
    def __init__(self, handler, lifetime: float):
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._stopped = False

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        threading.Thread(target=self.server.shutdown, daemon=True).start()  # safe from a handler thread too
        self._thread.join(timeout=5)
        self.server.server_close()
