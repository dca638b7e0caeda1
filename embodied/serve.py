"""`python -m embodied.serve policy=<checkpoint|random> port=8000`: a remote policy server.

A websocket server so that a GPU machine can serve the robot computer:

- On connect the server sends its metadata (policy, action dimension, protocol version).
- Each request `{"observation": {"image": uint8 HxWx3, "state": float32 (8,)}, "instruction": str}`
  gets `{"action": float32 (7,), "timing": {"infer_ms", "server_ms"}}`: the action for this control step
  (a chunked policy runs its chunks open-loop and remembers its last gripper command, as in evaluation);
  an error gets `{"error": "..."}` and the connection stays open.
- `{"reset": true}` starts an episode (the policy forgets its queued actions and gripper command) and gets
  `{"reset": true}`; a new connection starts one too. Each connection has its own episode stream on the
  shared weights (`session()`), so that one server drives several robots at once; their requests are
  answered one at a time.
- Encoding: msgpack (binary frames, the default) or JSON (text frames); numpy arrays travel as
  `{"__ndarray__": <bytes | base64 str>, "dtype": ..., "shape": [...]}` in both. A client picks
  JSON with `?encoding=json` in the URL; the server answers in the encoding it was sent.
- Health check: plain HTTP `GET /healthz` answers 200 with a JSON body.

The deploy loop uses a remote policy with `policy=ws://host:port` (`RemotePolicy`).
"""
from __future__ import annotations

import asyncio
import base64
import http
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from robots.server_thread import ServerThread

log = logging.getLogger(__name__)
# Apps that take a policy checkpoint path live in conf/rollout (a `policy` config group is in conf/).
CONF_DIR = Path(__file__).resolve().parent / "conf" / "rollout"

PROTOCOL_VERSION = 2  # 2: episode resets
MAX_MESSAGE_BYTES = 16 * 2**20
MAX_ARRAY_ELEMENTS = 8 * 2**20
ALLOWED_DTYPES = ("uint8", "int32", "int64", "float16", "float32", "float64", "bool")


class ProtocolError(ValueError):
    """A request that does not follow the policy server protocol."""


# -- numpy over msgpack / JSON ------------------------------------------------------------------

def _pack_array(array: np.ndarray, binary: bool) -> dict:
    array = np.ascontiguousarray(array)
    if array.dtype.name not in ALLOWED_DTYPES:
        raise ProtocolError(f"arrays of dtype {array.dtype.name} are not sent; allowed: {', '.join(ALLOWED_DTYPES)}")
    data = array.tobytes()
    return {"__ndarray__": data if binary else base64.b64encode(data).decode("ascii"),
            "dtype": array.dtype.name, "shape": list(array.shape)}


def _unpack_array(obj: Mapping) -> np.ndarray:
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("__ndarray__")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"array dtype {dtype!r} is not allowed; allowed: {', '.join(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape):
        raise ProtocolError(f"array shape {shape!r} must be a list of at most 8 non-negative integers")
    count = int(np.prod(shape)) if shape else 1
    if count > MAX_ARRAY_ELEMENTS:
        raise ProtocolError(f"array of {count} elements exceeds {MAX_ARRAY_ELEMENTS}")
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError:
            raise ProtocolError("array data is not valid base64") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError("array data must be bytes (msgpack) or a base64 string (JSON)")
    if len(data) != count * np.dtype(dtype).itemsize:
        raise ProtocolError(f"array data has {len(data)} bytes; shape {shape} of {dtype} needs "
                            f"{count * np.dtype(dtype).itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _to_wire(obj, binary: bool):
    if isinstance(obj, np.ndarray):
        return _pack_array(obj, binary)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): _to_wire(v, binary) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(v, binary) for v in obj]
    return obj


def _from_wire(obj, depth: int = 0):
    if depth > 16:
        raise ProtocolError("message nested too deeply")
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return _unpack_array(obj)
        return {k: _from_wire(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_wire(v, depth + 1) for v in obj]
    return obj


def pack(obj, binary: bool = True) -> bytes | str:
    """msgpack bytes (binary) or JSON text, arrays included."""
    wire = _to_wire(obj, binary)
    if binary:
        import msgpack

        return msgpack.packb(wire, use_bin_type=True)
    return json.dumps(wire, allow_nan=False)


def unpack(payload: bytes | str):
    if isinstance(payload, (bytes, bytearray)):
        import msgpack

        try:
            obj = msgpack.unpackb(payload, raw=False, max_bin_len=MAX_MESSAGE_BYTES, max_str_len=MAX_MESSAGE_BYTES,
                                  strict_map_key=True)
        except Exception as err:  # msgpack raises several types on corrupt input
            raise ProtocolError(f"not valid msgpack ({type(err).__name__})") from None
    else:
        try:
            obj = json.loads(payload)
        except ValueError as err:
            raise ProtocolError(f"not valid JSON ({str(err)[:100]})") from None
    return _from_wire(obj)


# -- server ------------------------------------------------------------------------------------------

def _check_request(request) -> tuple[dict, str]:
    if not isinstance(request, dict):
        raise ProtocolError(f"a request must be a map, got {type(request).__name__}")
    observation = request.get("observation")
    instruction = request.get("instruction", "")
    if not isinstance(observation, dict):
        raise ProtocolError("request field 'observation' must be a map with 'image' and 'state'")
    if not isinstance(instruction, str) or len(instruction) > 4096:
        raise ProtocolError("request field 'instruction' must be a string of at most 4096 characters")
    image = observation.get("image")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ProtocolError("observation 'image' must be a uint8 array of shape (H, W, 3)")
    state = observation.get("state")
    if state is not None:
        if not isinstance(state, np.ndarray) or state.ndim != 1 or not np.all(np.isfinite(state)):
            raise ProtocolError("observation 'state' must be a finite 1-D array")
    return observation, instruction


class PolicyServer(ServerThread):
    """Serves one policy to any number of connections, each its own episode stream; requests are answered
    one at a time (one model, one device)."""

    description = "the policy server"
    thread_name = "policy-server"

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, metadata: Mapping | None = None):
        super().__init__()
        self.policy = policy
        self.host, self.port = host, port
        self.meta = {"protocol_version": PROTOCOL_VERSION, "action_dim": 7, "encodings": ["msgpack", "json"],
                     **(policy.metadata() if hasattr(policy, "metadata") else {"policy": str(policy)}),
                     **dict(metadata or {})}
        self.requests = 0
        self.errors = 0
        self._lock: asyncio.Lock | None = None

    def _health(self, connection, request):
        if request.path.split("?")[0] in ("/healthz", "/health"):
            body = json.dumps({"status": "ok", "requests": self.requests, **self.meta}, default=str).encode()
            return connection.respond(http.HTTPStatus.OK, body.decode())
        return None

    async def _handler(self, ws) -> None:
        import websockets

        binary = "encoding=json" not in (ws.request.path if ws.request else "")
        # each connection is one robot's episode stream: its own queued actions and gripper command on the
        # shared weights (a policy without `session()` keeps no such state and is shared as it is)
        policy = self.policy.session() if hasattr(self.policy, "session") else self.policy
        async with self._lock:
            await asyncio.to_thread(self._reset_policy, policy)
        await ws.send(pack({"type": "metadata", **self.meta}, binary))
        try:
            async for payload in ws:
                started = time.perf_counter()
                is_binary = isinstance(payload, bytes)
                try:
                    request = unpack(payload)
                    if isinstance(request, dict) and "reset" in request:
                        if request["reset"] is not True or len(request) != 1:
                            raise ProtocolError("a reset request is exactly {\"reset\": true}")
                        async with self._lock:
                            await asyncio.to_thread(self._reset_policy, policy)
                        await ws.send(pack({"reset": True}, is_binary))
                        continue
                    observation, instruction = _check_request(request)
                    async with self._lock:
                        t0 = time.perf_counter()
                        action = await asyncio.to_thread(policy.predict_action, observation, instruction)
                        infer_ms = (time.perf_counter() - t0) * 1000
                    action = np.asarray(action, dtype=np.float32).reshape(-1)
                    if action.shape != (7,):
                        raise RuntimeError(f"the policy returned an action of shape {action.shape}, expected (7,)")
                    self.requests += 1
                    reply = {"action": action, "timing": {"infer_ms": infer_ms,
                                                           "server_ms": (time.perf_counter() - started) * 1000}}
                except ProtocolError as err:
                    self.errors += 1
                    reply = {"error": f"bad request: {err}"}
                except Exception as err:  # the policy failed: tell the client, keep serving
                    self.errors += 1
                    log.exception("policy failed on a request")
                    reply = {"error": f"policy error: {type(err).__name__}: {err}"}
                await ws.send(pack(reply, is_binary))
        except websockets.ConnectionClosed:
            pass

    @staticmethod
    def _reset_policy(policy) -> None:
        if hasattr(policy, "reset"):
            policy.reset()

    async def _serve(self) -> None:
        import websockets

        self._lock = asyncio.Lock()
        async with websockets.serve(self._handler, self.host, self.port, process_request=self._health,
                                    max_size=MAX_MESSAGE_BYTES, ping_interval=None,
                                    compression=None) as server:  # images: deflate costs more than it saves
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            log.info("serving %s on ws://%s:%d (health: http://%s:%d/healthz)", self.meta.get("policy"), self.host,
                     self.port, self.host, self.port)
            await self._stop.wait()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"


# -- client ------------------------------------------------------------------------------------------

class RemotePolicy:
    """A policy served by `python -m embodied.serve`, behind the common `predict_action` interface."""

    def __init__(self, url: str, encoding: str = "msgpack", timeout: float = 30.0):
        from websockets.sync.client import connect

        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding must be 'msgpack' or 'json', got {encoding!r}")
        self.url = url
        self.binary = encoding == "msgpack"
        self.timeout = timeout
        full = url if self.binary else url + ("&" if "?" in url else "?") + "encoding=json"
        try:
            self.ws = connect(full, max_size=MAX_MESSAGE_BYTES, open_timeout=timeout, close_timeout=2,
                              compression=None).__enter__()
        except OSError as err:
            raise ConnectionError(f"no policy server at {url} ({err}); start one with "
                                  "`python -m embodied.serve policy=...`") from err
        meta = unpack(self.ws.recv(timeout=timeout))
        if not isinstance(meta, dict) or meta.get("type") != "metadata":
            self.ws.close()
            raise ConnectionError(f"{url} did not send policy metadata on connect; is it `embodied.serve`?")
        if meta.get("protocol_version") != PROTOCOL_VERSION:
            self.ws.close()
            raise ConnectionError(f"policy server {url} speaks protocol version {meta.get('protocol_version')}, this "
                                  f"client {PROTOCOL_VERSION}; run the same version of embodied on both machines")
        self.server_metadata = meta
        self.name = f"remote:{meta.get('policy', url)}"
        self.last_timing: dict[str, float] = {}

    def predict_action(self, observation: Mapping[str, Any], instruction: str | None = None) -> np.ndarray:
        request = {"observation": {k: np.asarray(observation[k]) for k in ("image", "state", "wrist_image")
                                   if k in observation},
                   "instruction": instruction or str(observation.get("instruction", ""))}
        started = time.perf_counter()
        self.ws.send(pack(request, self.binary))
        reply = unpack(self.ws.recv(timeout=self.timeout))
        if not isinstance(reply, dict):
            raise RuntimeError(f"policy server {self.url} sent a malformed reply")
        if "error" in reply:
            raise RuntimeError(f"policy server {self.url}: {reply['error']}")
        action = np.asarray(reply.get("action"), dtype=np.float32)
        if action.shape != (7,):
            raise RuntimeError(f"policy server {self.url} sent an action of shape {action.shape}, expected (7,)")
        self.last_timing = {**reply.get("timing", {}), "round_trip_ms": (time.perf_counter() - started) * 1000}
        return action

    def reset(self) -> None:
        """Start an episode on the server: it forgets its queued actions and last gripper command."""
        self.ws.send(pack({"reset": True}, self.binary))
        reply = unpack(self.ws.recv(timeout=self.timeout))
        if not isinstance(reply, dict) or reply.get("reset") is not True:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise RuntimeError(f"policy server {self.url} did not acknowledge the episode reset"
                               + (f": {error}" if error else ""))

    def metadata(self) -> dict:
        return dict(self.server_metadata)

    def close(self) -> None:
        self.ws.close()


# -- entry point -------------------------------------------------------------------------------------

def _main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from embodied.policy_loader import load_policy

    output_dir = HydraConfig.get().runtime.output_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = load_policy(str(cfg.policy), seed=int(cfg.seed))
    server = PolicyServer(policy, cfg.host, int(cfg.port))
    print(f"serving policy {cfg.policy} on ws://{cfg.host}:{cfg.port} (health: http://{cfg.host}:{cfg.port}/healthz); "
          f"resolved config written to {output_dir}/.hydra", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main() -> None:
    import hydra

    # An absolute path: the app also runs when imported (tests), not only with `python -m`.
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")(_main)()


if __name__ == "__main__":
    main()
