"""Demo (same as ``pqv demo``): fine-tune the pretrained Fashion-MNIST ViT with Taylor structured
pruning, export it with MobileExport, print the trade-off table and write plots.

    python examples/demo.py                      # ~6 minutes on a 2-core CPU
    python examples/demo.py --ratio 0.5 --train-subset 55000 --epochs 2   # a fuller run
    python examples/demo.py --help
"""

import sys

from pqv_lightning.apps.demo import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
