"""The sample model exported to ONNX, run in ONNX Runtime side by side with PyTorch eager.

    python benchmarks/bench_export.py [--image-size 32] [--batches 1,32] [--threads N]
                                      [--seconds 8] [--max-rounds 100]

The model is the sample job's: training/pytorch_train.py's `build_model(10)` (a ResNet-18 with
10 classes), seeded, saved as a state dict and exported by expkit's `onnx` exporter through
the plugin manager, exactly as post-process does it (a worker in this interpreter,
torch.onnx.export with a dynamic batch, onnx.checker, the parity check in onnxruntime). So
the benchmark also proves the exported file: the export must pass its check, and the outputs
of the two sides are compared once more here on every batch size measured.

Input 3x32x32 as the sample job trains (`--image-size 224` for the seed's size). Two sides:
PyTorch eager (`torch.inference_mode()`, eval mode) and ONNX Runtime (CPUExecutionProvider,
its default graph optimisations and thread spinning), each with the same number of intra-op
threads (`--threads`, default: every core this process may use) and one inter-op thread. For
each batch size: a warm-up, then rounds of one block of calls (about 0.3 s) to each side,
alternating which goes first, until `--seconds` have passed (at least 4 rounds, at most
--max-rounds). Each block starts after 50 ms of rest and its first call is not counted: the
threads of both runtimes spin-wait after a call and slow the other side down when the two
are interleaved call by call (seen here on 2 cores: eager batch 1 took 6 ms alone, 14 ms
interleaved). Figures: latency median and p90 (ms) per call, throughput (images/s, from the
median) and ORT/eager, the throughput ratio (above 1: ONNX Runtime is faster). Other load on
the machine moves single calls; the alternation spreads it over both sides.

Prints a table and writes the figures as JSON to stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
BLOCK = 0.3  # seconds of calls to one side before switching to the other
SETTLE = 0.05  # seconds of rest before a block


def export_sample_model(folder: Path, image_size: int) -> tuple[Path, dict]:
    """Save the seeded sample model and export it with expkit's onnx exporter; model.onnx."""
    import torch

    from expkit.capabilities import ExportRequest
    from expkit.plugins import get_plugins

    sys.path.insert(0, str(TRAINING))
    from pytorch_train import build_model

    torch.manual_seed(0)
    torch.save(build_model(10).state_dict(), folder / "model.pt")
    request = ExportRequest(
        format="onnx",
        model_dir=folder,
        load={
            "file": "model.pt",
            "factory": "pytorch_train:build_model",
            "args": {"num_classes": 10},
        },
        input={"shape": [1, 3, image_size, image_size], "dtype": "float32", "dynamic_axes": [0]},
        options={},
        atol=1e-4,
        rtol=1e-3,
        out_dir=folder / "onnx",
        python=sys.executable,
        code_dir=TRAINING,
        say=lambda line: print(f"  export: {line}", file=sys.stderr, flush=True),
    )
    started = time.perf_counter()
    result = get_plugins().get("exporters", "onnx").export(request)
    seconds = time.perf_counter() - started
    if not result.ok:
        sys.exit(f"bench_export: the onnx export failed: {result.message}")
    checks = result.checks
    return folder / "onnx" / "model.onnx", {
        "export_seconds": round(seconds, 2),
        "opset": checks["opset"],
        "max_abs_error": checks["max_abs_error"],
        "max_rel_error": checks["max_rel_error"],
        "checked": [entry["input"] for entry in checks["checked"]],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_batch(model, session, batch: int, image_size: int, seconds: float, max_rounds: int):
    import numpy as np
    import torch

    x = np.random.default_rng(batch).standard_normal((batch, 3, image_size, image_size))
    x = x.astype(np.float32)
    tensor = torch.from_numpy(x)
    name = session.get_inputs()[0].name

    def eager() -> np.ndarray:
        with torch.inference_mode():
            return model(tensor).numpy()

    def ort() -> np.ndarray:
        return session.run(None, {name: x})[0]

    want, got = eager(), ort()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)  # the file is right here too
    sides = {"eager": eager, "ort": ort}
    per_call = {}
    for label, call in sides.items():  # warm-up: allocators, caches, thread pools
        start = time.perf_counter()
        for _ in range(3):
            call()
        per_call[label] = (time.perf_counter() - start) / 3
    # Blocks of calls, not call by call: each runtime's threads spin-wait after a call.
    times: dict[str, list[float]] = {"eager": [], "ort": []}
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < max_rounds and (rounds < 4 or time.perf_counter() < deadline):
        order = list(sides) if rounds % 2 == 0 else list(reversed(sides))
        for label in order:
            call, calls = sides[label], max(3, round(BLOCK / per_call[label]))
            time.sleep(SETTLE)  # the other side's threads stop spinning
            call()  # not counted: the first call after a switch
            for _ in range(calls):
                start = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - start)
        rounds += 1
    figures = {}
    for label, values in times.items():
        median = statistics.median(values)
        figures[label] = {
            "median_ms": median * 1000,
            "p90_ms": percentile(values, 0.9) * 1000,
            "images_per_s": batch / median,
            "calls": len(values),
        }
    figures["ort_over_eager"] = figures["ort"]["images_per_s"] / figures["eager"]["images_per_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seconds", type=float, default=8.0, help="per batch size, both sides")
    parser.add_argument("--max-rounds", type=int, default=100, help="rounds of two blocks")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    import onnxruntime
    import torch

    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file, export = export_sample_model(Path(tmp), args.image_size)
        sys.path.insert(0, str(TRAINING))
        from pytorch_train import build_model

        model = build_model(10)
        model.load_state_dict(torch.load(Path(tmp) / "model.pt", weights_only=True))
        model.eval()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(onnx_file), options, providers=["CPUExecutionProvider"]
        )
        results = {
            batch: bench_batch(
                model, session, batch, args.image_size, args.seconds, args.max_rounds
            )
            for batch in batches
        }

    size = args.image_size
    print(
        f"ResNet-18 (10 classes), input 3x{size}x{size}, {args.threads} threads each side; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, opset "
        f"{export['opset']}; export {export['export_seconds']:.1f} s, checked on "
        f"{', '.join(export['checked'])}: max abs error {export['max_abs_error']:.2g}"
    )
    header = f"{'batch':>5}  {'runtime':<22} {'median ms':>10} {'p90 ms':>9} {'images/s':>10}"
    print(header + f" {'ORT/eager':>10}")
    for batch, figures in results.items():
        for label, title in (("eager", "PyTorch eager"), ("ort", "ONNX Runtime (CPU)")):
            row = figures[label]
            ratio = f"{figures['ort_over_eager']:>9.2f}x" if label == "ort" else ""
            print(
                f"{batch:>5}  {title:<22} {row['median_ms']:>10.2f} {row['p90_ms']:>9.2f} "
                f"{row['images_per_s']:>10.1f} {ratio:>10}"
            )
    load = os.getloadavg()[0]
    print(
        f"load average (1 min): {load_before:.2f} before, {load:.2f} after; {os.cpu_count()} cores"
    )
    print(
        json.dumps(
            {"image_size": size, "threads": args.threads, "export": export, "batches": results}
        )
    )


if __name__ == "__main__":
    main()
