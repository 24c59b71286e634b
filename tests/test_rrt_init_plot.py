"""research/analysis/rrt_init_plot.py plots the numbers of docs/results/rrt.md's tables."""

import os

from matplotlib import image

from research.analysis import rrt_init_plot

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "results", "rrt.md")


def _rows(section: str) -> dict[str, str]:
  """The table rows of one '## N.' section of the page, keyed by their first word."""
  with open(DOC) as f:
    text = f.read().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
  return {line.split()[1]: line for line in text.splitlines() if line.startswith("| ")}


def test_the_plotted_numbers_are_the_tables_numbers(tmp_path):
  rank0, lora = _rows("2."), _rows("3.")
  for init, (step0, losses, step20) in rrt_init_plot.RANK0.items():
    cells = [c.strip().strip("*") for c in rank0[init].split("|")]
    assert cells[2:5] == [f"{step0:.4f}", " / ".join(f"{x:.2f}" for x in losses), f"{step20:.4f}"]
  for init, (losses, step20) in rrt_init_plot.LORA64.items():
    cells = [c.strip().strip("*") for c in lora[init].split("|")]
    assert cells[3:5] == [" / ".join(f"{x:.2f}" for x in losses), f"{step20:.4f}"]
  assert f"| {rrt_init_plot.ORIGINAL_NLL} |" in _rows("1.")["original"]

  path = tmp_path / "rrt_init.png"
  rrt_init_plot.plot(str(path))
  png = image.imread(path)
  assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 800
