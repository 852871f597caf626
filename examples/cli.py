"""LightningCLI entry point for the example configs in examples/configs/.

    python examples/cli.py fit --config examples/configs/fmnist_prune.yaml
    python examples/cli.py fit --config examples/configs/fmnist_prune.yaml --print_config
"""

from lightning.pytorch.cli import LightningCLI

from pqv_lightning.models import ImageClassifier


def main(args=None, run=True):
    return LightningCLI(ImageClassifier, save_config_kwargs={"overwrite": True}, args=args, run=run,
                        subclass_mode_data=True)


if __name__ == "__main__":
    main()
