"""The figure of docs/results/rrt.md: SmolLM2-135M converted to a Cycle Nr = 2 recursive model by
each init method, then uptrained 20 steps (rank 0, and rank-64 SVD LoRA).

  python -m research.analysis.rrt_init_plot   # writes docs/results/rrt_init.png

The numbers are those of the tables of docs/results/rrt.md (sections 1-3), copied here; the runs
themselves take hours on CPU. Change both together.
"""

import os
import sys

from matplotlib.figure import Figure

ORIGINAL_NLL = 3.5225  # section 1: the 30-layer SmolLM2-135M on the same validation batches
UNIFORM_NLL = 10.80  # ln 49152
STEPS = (1, 10, 20)
# init: (valid NLL at step 0, train loss at steps 1 / 10 / 20, valid NLL at step 20); section 2
RANK0 = {
    "Stepwise": (12.6086, (13.65, 8.01, 6.73), 6.6947),
    "Average": (14.6338, (15.30, 10.27, 8.35), 8.2952),
    "Lower": (21.6922, (22.59, 9.22, 8.57), 8.2750),
    "Random": (25.8643, (27.42, 14.30, 9.53), 9.6231),
}
# init: (train loss at steps 1 / 10 / 20, valid NLL at step 20); section 3 (no step-0 evaluation)
LORA64 = {
    "Average": ((13.43, 8.51, 7.36), 7.3899),
    "Stepwise": ((19.03, 7.51, 6.59), 6.6969),
    "Lower": ((17.33, 11.41, 8.51), 8.6581),
}
COLORS = {"Stepwise": "tab:blue", "Average": "tab:orange", "Lower": "tab:green",
          "Random": "tab:red"}
DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results",
                            "rrt_init.png")


def plot(path: str) -> None:
  """Two panels: train loss over the 20 steps; validation NLL at step 0 and step 20."""
  fig = Figure(figsize=(10, 4.2), layout="constrained")
  loss_ax, nll_ax = fig.subplots(1, 2)
  for init, (_, losses, _) in RANK0.items():
    loss_ax.plot(STEPS, losses, "o-", color=COLORS[init], label=f"{init}, rank 0")
  for init, (losses, _) in LORA64.items():
    loss_ax.plot(STEPS, losses, "s--", color=COLORS[init], alpha=0.8,
                 label=f"{init}, SVD LoRA r=64")
  loss_ax.set_xlabel("uptraining step (4 x 512 tokens each)")
  loss_ax.set_ylabel("train loss (nats)")
  loss_ax.set_title("train loss")
  loss_ax.set_xticks(STEPS)
  loss_ax.legend(fontsize="small", ncol=2)

  inits = list(RANK0)
  xs = range(len(inits))
  width = 0.27
  step0 = [RANK0[i][0] for i in inits]
  step20 = [RANK0[i][2] for i in inits]
  lora = [LORA64[i][1] if i in LORA64 else float("nan") for i in inits]
  nll_ax.bar([x - width for x in xs], step0, width, color="0.75", label="rank 0, step 0")
  nll_ax.bar(list(xs), step20, width, color=[COLORS[i] for i in inits], label="rank 0, step 20")
  nll_ax.bar([x + width for x in xs], lora, width, color=[COLORS[i] for i in inits], alpha=0.45,
             hatch="//", label="SVD LoRA r=64, step 20")
  for x, value in zip(xs, step20, strict=True):
    nll_ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize="small")
  nll_ax.axhline(UNIFORM_NLL, color="0.4", linestyle=":", label="uniform guess (10.80)")
  nll_ax.axhline(ORIGINAL_NLL, color="black", linestyle="--", label="original 30 layers (3.52)")
  nll_ax.set_xticks(list(xs), inits)
  nll_ax.set_ylabel("validation NLL (nats)")
  nll_ax.set_title("validation NLL (Random has no LoRA run)")
  nll_ax.legend(fontsize="small")
  fig.suptitle("SmolLM2-135M -> Cycle Nr = 2 recursive model: init methods, 20 uptraining steps")
  fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
  path = argv[1] if len(argv) > 1 else os.path.normpath(DEFAULT_PATH)
  plot(path)
  print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv)
