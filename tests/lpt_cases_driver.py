"""Runs many ``lpt`` command lines in one process (one import of torch and Lightning instead of one
per case) through the real entry point ``lpt_lightning.cli.main``, recording per case the exit
code, stdout and stderr (at the file-descriptor level: Lightning's logging included) and which
files under the watched folder changed.

    python lpt_cases_driver.py CASES.json RESULTS.json
"""
import hashlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(case: dict) -> dict:
    from lpt_lightning.cli import main

    os.chdir(case["cwd"])
    before = snapshot(Path(case["watch"]))
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            main(case["args"])
            code = 0
        except SystemExit as exc:  # what the interpreter would make of it
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - an uncaught error: the interpreter prints its traceback
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    after = snapshot(Path(case["watch"]))
    changed = sorted(p for p, digest in before.items() if after.get(p) != digest)
    return {"code": code, "stdout": stdout, "stderr": stderr, "changed": changed}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {name: run(case) for name, case in cases.items()}
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
