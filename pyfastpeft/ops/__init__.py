"""Registry wiring, ``torch.library`` primitives, autograd glue and the functional API of every op."""
