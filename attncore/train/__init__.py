"""The bundled NumPy trainer: autograd, layers, models, optimisers and the training loop.

Nothing here imports the compiled kernels, so the trainer (and the reference forward passes
the engine is tested against) works before, and without, a build of the extensions.

Modules
-------
autograd     Tensor and differentiable ops (reverse mode, tape based)
gradcheck    finite-difference gradient checks used by the tests
layers       Module base class and Linear / Embedding / LayerNorm / GRU / LSTM
optim        Adam / AdamW, learning-rate schedules, global-norm clipping
seq2seq      GRU/LSTM encoder-decoder with Bahdanau or Luong attention
transformer  encoder-decoder, decoder-only and encoder-only Transformers
loop         the training loop: progress bar, evaluation callback, checkpoints
cli          ``attncore train ...``
"""

__all__ = ["train"]


def train(task, arch, out_dir, **options):
    """Train ``arch`` on ``task`` and export the model directory ``out_dir``.

    See :func:`attncore.train.loop.train` for the options. Imported lazily so that
    ``import attncore.train.autograd`` stays light.
    """
    from .loop import train as _train

    return _train(task, arch, out_dir, **options)
