"""LightningCLI entry point for the example configs in examples/configs/ (same as ``pqv fit``).

python examples/cli.py fit --config examples/configs/fmnist_prune.yaml
python examples/cli.py fit --config examples/configs/fmnist_prune.yaml --print_config
"""

from pqv_lightning.apps.lightning_cli import run_cli


def main(args=None, run=True):
    return run_cli(args, run)


if __name__ == "__main__":
    main()
