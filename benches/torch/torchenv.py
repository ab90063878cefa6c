"""The project-local PyTorch venv shared by the Python scripts (stdlib only).

`ensure_venv(script)` creates `.venv-torch` (or $FLEXRUN_TORCH_VENV) on first use, installs
benches/torch/requirements-torch.txt whenever that file changes (a hash is kept in the venv), and re-runs
`script` with the same arguments inside it. FLEXRUN_TORCH_NO_VENV=1 skips all of this.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REQUIREMENTS = HERE / "requirements-torch.txt"
VENV = Path(os.environ.get("FLEXRUN_TORCH_VENV", str(ROOT / ".venv-torch")))


def ensure_venv(script: str) -> None:
    """Create/update the project venv and re-exec `script` inside it."""
    if os.environ.get("FLEXRUN_TORCH_NO_VENV") == "1":
        return
    venv = VENV.absolute()
    if Path(sys.prefix).absolute() == venv:
        return  # already running inside it
    py = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not py.exists():
        print(f"[bootstrap] creating venv {venv}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)], stdout=sys.stderr)
    if not stamp.exists() or stamp.read_text().strip() != want:
        print(f"[bootstrap] installing {REQUIREMENTS} into {venv}", file=sys.stderr)
        subprocess.check_call(
            [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
            stdout=sys.stderr,
        )
        stamp.write_text(want + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(py), [str(py), str(Path(script).resolve()), *sys.argv[1:]])
