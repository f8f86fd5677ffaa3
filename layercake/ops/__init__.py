"""How a linear layer multiplies: the weight forms (``linear``), our CPU kernels (``kernels``,
``csrc/``) and the forms they take (``blocks``, ``int4pack``, ``mkl``)."""
