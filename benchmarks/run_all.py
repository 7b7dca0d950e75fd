"""Run every speed / memory benchmark and regenerate docs/benchmarks.md.

    python benchmarks/run_all.py                   # CPU, fp32, 1 thread (what `make bench` runs; ~15 min)
    python benchmarks/run_all.py --device cuda     # GPU, bf16-mixed autocast, larger batches
    python benchmarks/run_all.py --quick           # smoke version (smaller batches, fewer rounds)
    python benchmarks/run_all.py --render          # only rewrite docs/benchmarks.md from saved results
    python benchmarks/run_all.py --only model --sections phase3   # rerun the scorer figures (minutes)

Raw results go to ``benchmarks/results/bench_<device>[_quick].json``; the page shows every device
whose results are present (a GPU run adds its section next to the CPU one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from benchmarks import common as C  # noqa: E402
from benchmarks import report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default=None,
                        help="default: fp32 on CPU, bf16-mixed on GPU")
    parser.add_argument("--quick", action="store_true", help="smoke version: fewer batch sizes and rounds")
    parser.add_argument("--only", choices=["model", "data"], nargs="*", default=None, help="run only these parts")
    parser.add_argument("--sections", choices=["experts", "phase3", "cost_growth"], nargs="+", default=None,
                        help="with --only model: rerun only these sections of the model benchmarks and merge them "
                             "into the saved model figures (phase3 still builds the phase-1/2 checkpoints it needs)")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default on CPU: 1, see docs/benchmarks.md; GPU: torch's default)")
    args = parser.parse_args(argv)
    if args.sections and args.only != ["model"]:
        parser.error("--sections selects sections of the model benchmarks: use it with --only model")

    if not args.render:
        import warnings

        import torch

        warnings.filterwarnings("ignore")
        torch.manual_seed(0)
        env = C.make_env(args.device, args.precision)
        threads = args.threads or (1 if not env.is_cuda else None)
        if threads:
            # On a few cores shared with other jobs, 2 OpenMP threads stall at every barrier whenever the
            # other core is taken (5x swings seen here); one thread per process measures steadily.
            torch.set_num_threads(threads)
        parts = args.only or ["model", "data"]
        tag = env.device.type + ("_quick" if args.quick else "")
        out_path = RESULTS / f"bench_{tag}.json"
        previous = json.loads(out_path.read_text()) if out_path.is_file() and args.only else {}
        if args.sections and not previous.get("model"):
            parser.error(f"--sections merges into the saved model figures, and {out_path} has none: run "
                         "--only model first")
        this_run = {"machine": C.machine_info(env), "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "load_average_start": C.load_average(),
                    "command": "python benchmarks/run_all.py" + "".join(
                        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))}
        # `--only` replaces its parts in the saved results; the run record (machine, date, command) stays
        # that of the parts not rerun, and each rerun part carries its own ("run").
        result = previous or dict(this_run)
        t0 = time.perf_counter()

        def log(msg: str) -> None:
            print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

        if "model" in parts:
            from benchmarks import bench_model

            log("== model benchmarks (ViT-B/16 shapes) ==")
            if args.sections:
                # Only these sections' figures (and the config) change; the others keep their run record.
                new = bench_model.run(env, args.quick, log, sections=tuple(args.sections))
                new.pop("seconds")
                result["model"] |= new
            else:
                result["model"] = bench_model.run(env, args.quick, log)
        if "data" in parts:
            from benchmarks import bench_data

            log("== data loading ==")
            result["data"] = bench_data.run(env, args.quick, log)
        finished = {"seconds": time.perf_counter() - t0, "load_average_end": C.load_average()}
        if args.sections:
            result["model"].setdefault("section_runs", {}).update(dict.fromkeys(args.sections, this_run | finished))
        elif previous:
            for part in parts:
                result[part]["run"] = this_run | finished
        else:
            result |= finished
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))
        log(f"wrote {out_path}")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(report.render(RESULTS))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
