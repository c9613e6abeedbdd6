"""Copy the demo's dilemmas rows into the README's demo table, and its xentropy figure into docs/img/.

Usage: snakemake --cores 2 --configfile config/demo.yaml && python docs/update_readme.py

The README shows the figure near its top (a fixed link to docs/img/) and the table in its demo section, between
the demo-table markers; only the text between the markers is replaced.
"""

import argparse
import re
import shutil
from pathlib import Path

from moralign.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
FIGURE = "dilemmas_xentropy_bars.png"


def main() -> None:
    """Replace the README's demo block with the dilemmas rows of reports/demo/results.md; refresh the figure."""
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {START} and {END} are missing")
    lines = (ROOT / "reports/demo/results.md").read_text().splitlines()
    header, rule = lines[:2]
    rows = [r for r in lines[2:] if r.startswith("| dilemmas | model") or r.startswith("| dilemmas | reference")]
    block = "\n".join([START, header, rule, *rows, END])
    (ROOT / "docs/img").mkdir(exist_ok=True)
    shutil.copy(ROOT / "reports/demo/figures" / FIGURE, ROOT / "docs/img" / f"demo_{FIGURE}")
    with atomic_path(readme) as tmp:
        tmp.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


if __name__ == "__main__":
    main()
