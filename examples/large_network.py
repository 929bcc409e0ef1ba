"""Training a network larger than one device: an FT-Transformer (or a tabular ResNet) split over
``--stages`` spawned workers, with the memory of every process measured.

    python examples/large_network.py                                     # 5.3M parameters
    python examples/large_network.py --tokens 1024 --blocks 16           # 112M parameters
    python examples/large_network.py --tokens 2048 --blocks 36 --stages 4  # 1.0B parameters

What it shows: ``plan()`` before training (each stage's parameters and estimated peak memory,
and where the network is built: each worker builds only its own layers), the fit, the peak
resident memory of the driver and of each worker (sampled with psutil while the fit runs), and
that predictions of the gathered network are those of the stages.
"""

import argparse
import os
import threading
import time

import numpy as np
import psutil

from skpipe import PipeNetClassifier, shutdown_workers
from skpipe.modules import FTTransformer, TabularResNet

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=["ft_transformer", "resnet"], default="ft_transformer")
parser.add_argument("--tokens", type=int, default=256, help="d_token (FT) / width (ResNet)")
parser.add_argument("--blocks", type=int, default=12)
parser.add_argument("--stages", type=int, default=2)
parser.add_argument("--rows", type=int, default=512)
parser.add_argument("--epochs", type=int, default=1)
args = parser.parse_args()
if os.environ.get("SKPIPE_EXAMPLE_QUICK"):
    args.tokens, args.blocks, args.rows = 32, 4, 128

rng = np.random.RandomState(0)
X = rng.normal(size=(args.rows, 24)).astype(np.float32)
y = (X[:, :3].sum(axis=1) > 0).astype(int)

if args.model == "ft_transformer":
    module, sizes = FTTransformer, {"module__d_token": args.tokens, "module__n_blocks": args.blocks,
                                    "module__n_heads": 8}
else:
    module, sizes = TabularResNet, {"module__width": args.tokens, "module__n_blocks": args.blocks}
est = PipeNetClassifier(module=module, **sizes, n_stages=args.stages, launcher="spawn",
                        batch_size=64, max_epochs=args.epochs, lr=1e-4, random_state=0)

report = est.plan(X, y)
print(report, "\n")


class PeakMemory:
    """Peak resident memory of this process and of each process it starts, while running."""

    def __init__(self):
        self.peaks, self._stop = {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peaks


memory = PeakMemory()
start = time.perf_counter()
est.fit(X, y)
seconds = time.perf_counter() - start
peaks = memory.stop()
n_params = sum(p.numel() for p in est.module_.parameters())
print(f"{n_params / 1e6:.1f}M parameters ({n_params * 4 / 2**30:.2f} GiB of float32 weights), "
      f"fit in {seconds:.1f} s, {est.plan_.construction}")
driver = peaks.pop(os.getpid())
print(f"peak memory: driver {driver / 2**30:.2f} GiB, workers "
      + ", ".join(f"{b / 2**30:.2f}" for b in sorted(peaks.values(), reverse=True)) + " GiB")
print(f"estimated by plan(): {', '.join(f'{m / 1024:.2f}' for m in report.stage_MiB)} GiB per "
      "stage (weights, gradients, Adam, activations; plus each process's own torch)")

# the gathered network predicts what the stages compute
outputs = est.forward_pipelined(X[:64])
print("train accuracy:", round(float((est.predict(X) == y).mean()), 3),
      "| the stages' predictions equal the gathered network's:",
      bool((np.argmax(outputs, axis=1) == est.predict(X[:64])).all()))
shutdown_workers()
