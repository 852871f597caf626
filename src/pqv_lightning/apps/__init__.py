"""Applications built on the library: the ``pqv`` command line, the Fashion-MNIST demo, training
recipes, the paper sweep with its report and plots. Nothing in :mod:`pqv_lightning` outside this
package imports from it."""
