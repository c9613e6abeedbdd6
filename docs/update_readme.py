"""Copy the demo's table and one figure into the README (run after the demo).

Usage: snakemake --cores 2 --configfile config/demo.yaml && python docs/update_readme.py
"""

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
FIGURE = "dilemmas_xentropy_bars.png"


def main() -> None:
    """Replace the README's demo block with the dilemmas rows of reports/demo/results.md and its figure."""
    lines = (ROOT / "reports/demo/results.md").read_text().splitlines()
    header, rule = lines[:2]
    rows = [r for r in lines[2:] if r.startswith("| dilemmas | model") or r.startswith("| dilemmas | reference")]
    table = "\n".join([header, rule, *rows])
    (ROOT / "docs/img").mkdir(exist_ok=True)
    shutil.copy(ROOT / "reports/demo/figures" / FIGURE, ROOT / "docs/img" / f"demo_{FIGURE}")
    block = f"{START}\n{table}\n\n![demo: dilemmas xentropy](docs/img/demo_{FIGURE})\n{END}"
    readme = ROOT / "README.md"
    text = readme.read_text()
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


if __name__ == "__main__":
    main()
