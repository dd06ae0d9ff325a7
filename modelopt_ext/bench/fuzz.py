"""Fuzz the parsers of untrusted input for a bounded time; report every input's outcome.

    python -m modelopt_ext.bench.fuzz [--seconds 20] [--targets wire,hidden_states,recipe,job_spec] [--seed 0]
                                      [--http-url http://127.0.0.1:PORT]

Each target mutates a VALID input (so the structural parser is reached, not only the first check: wire
messages get their length and checksum recomputed, safetensors files keep a parseable JSON header) and
feeds it to the parser. Outcomes:

- `ok`: parsed (the mutation kept it valid);
- `clean`: the format's own error, one line per problem (WireFormatError, HiddenStateFileError, ConfigError,
  an HTTP 4xx with a JSON error);
- `crash`: anything else (another exception type, a traceback-shaped or empty message, an HTTP 5xx or a
  dropped connection, a file touched outside the shared-storage root). The first few are printed with the
  input, so they can be replayed.

Time-bounded (`--seconds` split over the targets); prints a table and exits 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
import yaml

#: Integers that break parsers more often than random ones do (sizes, signs, overflows).
_EDGES = (
    0,
    1,
    2,
    7,
    8,
    255,
    256,
    0xFFFF,
    1 << 31,
    (1 << 32) - 1,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
)


@dataclass
class Outcomes:
    """Counts per outcome for one target, and the first crashing inputs."""

    target: str
    tried: int = 0
    ok: int = 0
    clean: int = 0
    crashes: list[tuple[str, str]] = field(default_factory=list)  # (input repr, what happened)
    crash_count: int = 0
    seconds: float = 0.0

    def record(self, outcome: str, sample: object = None, what: str = "") -> None:
        """Count one input's outcome ('ok', 'clean' or 'crash')."""
        self.tried += 1
        if outcome == "ok":
            self.ok += 1
        elif outcome == "clean":
            self.clean += 1
        else:
            self.crash_count += 1
            if len(self.crashes) < 5:
                self.crashes.append((repr(sample)[:300], what[:300]))


def _one_line(e: BaseException) -> bool:
    text = str(e)
    return bool(text.strip()) and "Traceback" not in text


def _mutate_bytes(rng: random.Random, data: bytes, hot: list[int]) -> bytearray:
    """A few random edits of `data`; `hot` are offsets of length/shape fields, hit more often."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.35 and hot:
            off = rng.choice(hot)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_EDGES) if rng.random() < 0.7 else rng.getrandbits(8 * width)
            value &= (1 << (8 * width)) - 1
            buf[off : off + width] = value.to_bytes(width, "little")[: max(0, len(buf) - off)]
        elif op < 0.6 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.8 and buf:
            i = rng.randrange(len(buf))
            buf[i] = rng.randrange(256)
        elif op < 0.9:
            del buf[rng.randrange(len(buf) + 1) :]
        else:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return buf


# ------------------------------------------------------------------------------------------ wire


def _wire_seed_messages() -> list[tuple[bytes, list[int]]]:
    """Valid messages and the offsets of their count/length/dtype/ndim/shape fields."""
    from modelopt_ext.supply.target_server import wire
    samples = [
        {"input_ids": torch.arange(12).view(3, 4), "mask": torch.ones(3, 4, dtype=torch.bool)},
        {"h": torch.randn(2, 3, 5).to(torch.bfloat16), "none": None, "e": torch.empty(0, 7)},
        {"x": torch.tensor(3.5, dtype=torch.float64)},
    ]
    out = []
    for tensors in samples:
        msg = wire.encode(tensors)
        hot = [8, 12, 20]  # entry count, payload length, crc
        pos = wire.HEADER_SIZE
        for key, value in tensors.items():
            hot.append(pos)  # key length
            pos += 2 + len(key.encode())
            hot += [pos, pos + 1, pos + 2]  # is_none, dtype code, ndim
            ndim = 0 if value is None else value.dim()
            pos += 3
            hot += [pos + 8 * i for i in range(ndim + 1)]  # shape, byte count
            pos += 8 * ndim + 8
            pos += (-pos) % wire.ALIGN
            pos += 0 if value is None else value.numel() * value.element_size()
        out.append((msg, hot))
    return out


def _fix_wire(buf: bytearray) -> None:
    """Recompute the payload length and checksum so the structural parser sees the mutation."""
    from modelopt_ext.supply.target_server import wire
    if len(buf) < wire.HEADER_SIZE:
        return
    struct.pack_into("<Q", buf, 12, len(buf) - wire.HEADER_SIZE)
    struct.pack_into("<I", buf, 20, zlib.crc32(buf[wire.HEADER_SIZE :]))


def fuzz_wire(rng: random.Random, deadline: float, out: Outcomes) -> None:
    """wire.decode on mutated messages: a dict, or WireFormatError in one line."""
    from modelopt_ext.supply.target_server import wire
    seeds = _wire_seed_messages()
    while time.monotonic() < deadline:
        msg, hot = rng.choice(seeds)
        buf = _mutate_bytes(rng, msg, hot)
        if rng.random() < 0.85:
            _fix_wire(buf)
        try:
            decoded = wire.decode(buf)
            # A decoded message must be usable: every tensor readable.
            for t in decoded.values():
                if t is not None:
                    t.clone()
            out.record("ok")
        except wire.WireFormatError as e:
            out.record("clean" if _one_line(e) and "\n" not in str(e) else "crash", bytes(buf), str(e))
        except Exception as e:  # noqa: BLE001 - the point is to see every other failure
            out.record("crash", bytes(buf), f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------ hidden-state files


def _safetensors_seed() -> bytes:
    from safetensors.torch import save

    return save({"token_ids": torch.arange(6), "hidden_states": torch.randn(6, 3, 4)})


def _mutate_safetensors(rng: random.Random, blob: bytes) -> bytes:
    """Mutate the JSON header's values (dtype, shape, offsets) and keep it parseable, or mutate raw bytes."""
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    if rng.random() < 0.25:
        return bytes(_mutate_bytes(rng, blob, [0]))
    key = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[key]
    what = rng.choice(("dtype", "shape", "offsets", "drop", "rename", "extra"))
    if what == "dtype":
        entry["dtype"] = rng.choice(("F32", "F16", "BF16", "I64", "I8", "BOOL", "F8_E4M3", "XX", "", "U64"))
    elif what == "shape":
        entry["shape"] = [rng.choice(_EDGES[:12]) for _ in range(rng.randint(0, 5))]
    elif what == "offsets":
        entry["data_offsets"] = [rng.choice(_EDGES), rng.choice(_EDGES)]
    elif what == "drop":
        del header[key]
    elif what == "rename":
        header[key + "x"] = header.pop(key)
    else:
        header["junk"] = {
            "dtype": "F32",
            "shape": [rng.randint(0, 4)],
            "data_offsets": [0, rng.randint(0, 64)],
        }
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def fuzz_hidden_states(rng: random.Random, deadline: float, out: Outcomes) -> None:
    """read_hidden_states_file on mutated files and hostile paths: a result or a HiddenStateFileError,
    and nothing outside the shared-storage root is read, written or deleted."""
    from modelopt_ext.supply.vllm.files import HiddenStateFileError, read_hidden_states_file

    seed = _safetensors_seed()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "root"
        root.mkdir()
        outside = base / "outside.safetensors"
        outside.write_bytes(seed)
        (base / "outside.safetensors.lock").touch()
        (root / "link.safetensors").symlink_to(outside)
        hostile = [
            str(outside),
            str(root / ".." / "outside.safetensors"),
            str(root / "link.safetensors"),
            "relative.safetensors",
            str(root),
            "",
            str(root / "a\x00b"),
            str(root / "missing.safetensors"),
        ]
        i = 0
        while time.monotonic() < deadline:
            i += 1
            if rng.random() < 0.1:
                path = rng.choice(hostile)
                blob = b""
            else:
                path = str(root / f"f{i}.safetensors")
                blob = _mutate_safetensors(rng, seed) if rng.random() < 0.95 else seed
                Path(path).write_bytes(blob)
                Path(path + ".lock").touch()  # the writer is done: no incomplete-file retries
            try:
                read_hidden_states_file(path, root, expected_num_layers=3, lock_timeout_s=1.0)
                outcome, what = "ok", ""
            except HiddenStateFileError as e:
                outcome, what = ("clean" if _one_line(e) and "\n" not in str(e) else "crash"), str(e)
            except Exception as e:  # noqa: BLE001
                outcome, what = "crash", f"{type(e).__name__}: {e}"
            if not outside.is_file() or outside.read_bytes() != seed:
                outcome, what = "crash", "the file outside the shared-storage root was changed or deleted"
                outside.write_bytes(seed)
            out.record(outcome, (path, blob[:200]), what)
        left = [p.name for p in root.iterdir() if p.name != "link.safetensors"]
        if left:
            out.record("crash", left[:5], f"{len(left)} files left in the shared-storage root")


# ------------------------------------------------------------------------------------------ recipes and specs


def _mutate_tree(rng: random.Random, tree: object, depth: int = 0) -> object:
    """A copy of a YAML tree with one random change somewhere (value swapped, key dropped or added)."""
    junk = [
        None,
        -1,
        0,
        1e309,
        "",
        "x" * 300,
        [],
        {},
        [1, "a"],
        {"k": None},
        True,
        "${UNDEFINED_VAR}",
        "../../etc",
    ]
    if isinstance(tree, dict) and tree and depth < 6:
        tree = dict(tree)
        key = rng.choice(list(tree))
        r = rng.random()
        if r < 0.55:
            tree[key] = _mutate_tree(rng, tree[key], depth + 1)
        elif r < 0.7:
            del tree[key]
        elif r < 0.85:
            tree[key + rng.choice(("_", "s", "x"))] = tree.pop(key)
        else:
            tree[rng.choice(("extra", "__class__", "_factory_", "0"))] = rng.choice(junk)
        return tree
    if isinstance(tree, list) and tree and depth < 6:
        tree = list(tree)
        i = rng.randrange(len(tree))
        tree[i] = _mutate_tree(rng, tree[i], depth + 1)
        return tree
    return rng.choice(junk)


def _fuzz_yaml(
    rng: random.Random,
    deadline: float,
    out: Outcomes,
    seed_file: Path,
    parse: Callable[[Path], object],
) -> None:
    from modelopt_ext.util.errors import ConfigError

    base = yaml.safe_load(seed_file.read_text())
    text = seed_file.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / seed_file.name
        while time.monotonic() < deadline:
            if rng.random() < 0.2:
                sample = bytes(_mutate_bytes(rng, text.encode(), [])).decode("utf-8", "replace")
            else:
                sample = yaml.safe_dump(_mutate_tree(rng, base), sort_keys=False)
            path.write_text(sample)
            try:
                parse(path)
                out.record("ok")
            except ConfigError as e:
                lines = e.lines()
                good = bool(lines) and all(line.strip() and "Traceback" not in line for line in lines)
                out.record("clean" if good else "crash", sample, str(e))
            except Exception as e:  # noqa: BLE001
                out.record("crash", sample, f"{type(e).__name__}: {e}")


REPO = Path(__file__).resolve().parents[2]


def fuzz_recipe(rng: random.Random, deadline: float, out: Outcomes) -> None:
    """load_recipe on mutated recipes: a Recipe, or ConfigError (one line per problem)."""
    from modelopt_ext.config.recipe import load_recipe

    _fuzz_yaml(rng, deadline, out, REPO / "recipes" / "eagle3" / "tiny.yaml", load_recipe)


def fuzz_job_spec(rng: random.Random, deadline: float, out: Outcomes) -> None:
    """launcher.spec.load_job on mutated job specs: a Job, or ConfigError (one line per problem)."""
    from launcher.spec import load_job

    env = {"HOME": "/nonexistent"}
    _fuzz_yaml(
        rng,
        deadline,
        out,
        REPO / "examples" / "local" / "slurm_streaming_eagle3.yaml",
        lambda p: load_job(p, environ=env),
    )


# ------------------------------------------------------------------------------------------ HTTP


def fuzz_http(url: str) -> Callable[[random.Random, float, Outcomes], None]:
    """serve_target's endpoints with hostile requests: every answer a 2xx/4xx with a JSON error, never a 5xx
    or a dropped connection, and the server still healthy at the end."""
    parts = urlsplit(url)
    routes = [
        "/health",
        "/model_info",
        "/input_embeddings",
        "/set_vocab_mapping",
        "/generate",
        "/init_nccl",
        "/disconnect",
        "/nope",
        "/generate/../health",
        "//",
        "/" + "a" * 3000,
    ]
    ctypes = ["application/json", "application/x-modelopt-tensors", "text/plain", "", "application/json; x=1"]

    def run(rng: random.Random, deadline: float, out: Outcomes) -> None:
        seeds = _wire_seed_messages()
        while time.monotonic() < deadline:
            method = rng.choice(("GET", "POST", "POST", "PUT", "DELETE"))
            route = rng.choice(routes)
            kind = rng.random()
            if kind < 0.4:
                msg, hot = rng.choice(seeds)
                body = bytes(_mutate_bytes(rng, msg, hot))
                if rng.random() < 0.8:
                    b = bytearray(body)
                    _fix_wire(b)
                    body = bytes(b)
            elif kind < 0.7:
                body = json.dumps(
                    _mutate_tree(rng, {"aux_layer_ids": [1, 2], "client_id": "c", "world": 2})
                ).encode()
            else:
                body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
            headers = {"Content-Type": rng.choice(ctypes)}
            if rng.random() < 0.2:
                headers["X-Modelopt-Meta"] = rng.choice(("{", "[]", '{"a": 1}', "null", "\u00ff"))
            length = len(body)
            if rng.random() < 0.1:
                headers["Content-Length"] = rng.choice(("-1", "abc", str(1 << 40), "0"))
            sample = (method, route, headers, body[:120])
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            try:
                conn.putrequest(method, route, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v.encode("utf-8", "replace") if isinstance(v, str) else v)
                if "Content-Length" not in headers:
                    conn.putheader("Content-Length", str(length))
                conn.endheaders(body if headers.get("Content-Length", str(length)) == str(length) else b"")
                resp = conn.getresponse()
                payload = resp.read()
                if resp.status >= 500:
                    out.record("crash", sample, f"HTTP {resp.status}: {payload[:200]!r}")
                elif resp.status >= 400:
                    err = json.loads(payload).get("error", "")
                    out.record("clean" if err and "\n" not in err else "crash", sample, err)
                else:
                    out.record("ok")
            except (OSError, http.client.HTTPException, ValueError) as e:
                out.record("crash", sample, f"{type(e).__name__}: {e}")
            finally:
                conn.close()
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status != 200:
                out.record("crash", "GET /health", "the server is not healthy after the fuzz")
        except OSError as e:
            out.record("crash", "GET /health", f"the server is gone after the fuzz: {e}")
        finally:
            conn.close()

    return run


TARGETS: dict[str, Callable[[random.Random, float, Outcomes], None]] = {
    "wire": fuzz_wire,
    "hidden_states": fuzz_hidden_states,
    "recipe": fuzz_recipe,
    "job_spec": fuzz_job_spec,
}


def run_fuzz(targets: dict[str, Callable], seconds: float, seed: int = 0) -> list[Outcomes]:
    """Run each target for `seconds / len(targets)`; return their outcomes."""
    results = []
    share = seconds / max(len(targets), 1)
    for name, fn in targets.items():
        out = Outcomes(name)
        start = time.monotonic()
        fn(random.Random(f"{seed}-{name}"), start + share, out)
        out.seconds = time.monotonic() - start
        results.append(out)
    return results


def format_table(results: list[Outcomes]) -> str:
    """The outcome table, then the first crashing inputs of each target."""
    rows = [f"{'target':<14} {'inputs':>9} {'inputs/s':>9} {'ok':>8} {'clean error':>12} {'crash':>6}"]
    for r in results:
        rate = r.tried / max(r.seconds, 1e-9)
        rows.append(f"{r.target:<14} {r.tried:>9} {rate:>9.0f} {r.ok:>8} {r.clean:>12} {r.crash_count:>6}")
    for r in results:
        for sample, what in r.crashes:
            rows.append(f"crash in {r.target}: {what}\n  input: {sample}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI: fuzz for a bounded time, print the table, exit 1 on any crash."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.bench.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="Total time budget, split over the targets.")
    p.add_argument(
        "--targets", default=",".join(TARGETS), help=f"Comma-separated, of: {', '.join(TARGETS)}, http."
    )
    p.add_argument("--http-url", default=None, help="A running serve_target to fuzz (adds the http target).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    chosen: dict[str, Callable] = {}
    for name in [t for t in args.targets.split(",") if t]:
        if name == "http":
            if not args.http_url:
                p.error("the http target needs --http-url")
            chosen[name] = fuzz_http(args.http_url)
        elif name in TARGETS:
            chosen[name] = TARGETS[name]
        else:
            p.error(f"unknown target {name!r}; choose from {', '.join(TARGETS)}, http")
    if args.http_url and "http" not in chosen:
        chosen["http"] = fuzz_http(args.http_url)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    results = run_fuzz(chosen, args.seconds, args.seed)
    print(format_table(results))
    return 1 if any(r.crash_count for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
