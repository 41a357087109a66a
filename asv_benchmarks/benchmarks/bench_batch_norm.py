"""fastbn.nn's fused ops and the batch_norm layer, per backend and case.

time_*: how long; peakmem_*: the process's peak memory while it runs;
track_*: a checksum of the result, so that a commit that changes the numbers
shows as a step in the graph.
"""

import numpy as np

import fastbn

from .common import Benchmark, checksum


class TrainForward(Benchmark):
    def time_fused_batch_norm(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm(self.x, self.scale, self.offset,
                                       data_format=self.data_format, out=self.out)

    def peakmem_fused_batch_norm(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm(self.x, self.scale, self.offset,
                                       data_format=self.data_format)

    def track_output_checksum(self, backend, case):
        with fastbn.backends.use(backend):
            y, _, _ = fastbn.nn.fused_batch_norm(self.x, self.scale, self.offset,
                                                 data_format=self.data_format)
        return checksum(y)


class Inference(Benchmark):
    def setup(self, backend, case):
        super().setup(backend, case)
        # What the in-place inference overwrites, call after call.
        self.x_inplace = self.x.copy()

    def time_fused_batch_norm_in_place(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm(self.x_inplace, self.scale, self.offset, self.mean,
                                       self.variance, data_format=self.data_format,
                                       is_training=False, out=self.x_inplace)

    def time_fused_batch_norm(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm(self.x, self.scale, self.offset, self.mean, self.variance,
                                       data_format=self.data_format, is_training=False,
                                       out=self.out)

    def peakmem_fused_batch_norm(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm(self.x, self.scale, self.offset, self.mean, self.variance,
                                       data_format=self.data_format, is_training=False)


class Backward(Benchmark):
    def setup(self, backend, case):
        super().setup(backend, case)
        # What the in-place gradient overwrites, call after call; with this scale dx is dy
        # less its projections on 1 and x_hat, so a second call gives the first's dx again.
        self.dy_inplace = self.dy.copy()
        self.unit_scale = np.sqrt(self.variance.astype(np.float64) + 0.001).astype(np.float32)

    def time_fused_batch_norm_grad_in_place(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm_grad(self.dy_inplace, self.x, self.unit_scale, self.mean,
                                            self.variance, data_format=self.data_format,
                                            out=self.dy_inplace)

    def time_fused_batch_norm_grad(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm_grad(self.dy, self.x, self.scale, self.mean,
                                            self.variance, data_format=self.data_format,
                                            out=self.out)

    def peakmem_fused_batch_norm_grad(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.fused_batch_norm_grad(self.dy, self.x, self.scale, self.mean,
                                            self.variance, data_format=self.data_format)

    def track_input_gradient_checksum(self, backend, case):
        with fastbn.backends.use(backend):
            dx, _, _ = fastbn.nn.fused_batch_norm_grad(self.dy, self.x, self.scale, self.mean,
                                                       self.variance,
                                                       data_format=self.data_format)
        return checksum(dx)


class Layer(Benchmark):
    """The whole layer: variables, scopes and in-place moving-average updates."""

    def setup(self, backend, case):
        super().setup(backend, case)
        self.graph = fastbn.Graph()

    def time_batch_norm(self, backend, case):
        with fastbn.backends.use(backend), self.graph.as_default():
            fastbn.batch_norm(self.x, scale=True, data_format=self.data_format, scope="bn",
                              reuse=fastbn.AUTO_REUSE, updates_collections=None)

    def time_batch_norm_sigmoid(self, backend, case):
        # The activation applied as the normalization writes its output (Cython backend).
        with fastbn.backends.use(backend), self.graph.as_default():
            fastbn.batch_norm(self.x, scale=True, data_format=self.data_format, scope="bn",
                              reuse=fastbn.AUTO_REUSE, updates_collections=None,
                              activation_fn=fastbn.nn.sigmoid)

    def time_batch_norm_with_tape(self, backend, case):
        self._forward_and_gradient(backend, None)

    def time_batch_norm_relu_with_tape(self, backend, case):
        self._forward_and_gradient(backend, fastbn.nn.relu)

    def _forward_and_gradient(self, backend, activation):
        with fastbn.backends.use(backend), self.graph.as_default():
            with fastbn.GradientTape() as tape:
                y = fastbn.batch_norm(self.x, scale=True, data_format=self.data_format,
                                      scope="bn", reuse=fastbn.AUTO_REUSE,
                                      updates_collections=None, activation_fn=activation)
            tape.gradient(y, [self.x], output_gradients=self.dy)


class Activations(Benchmark):
    """The activations batch_norm applies after the normalization (all but the fused
    relu; the kernels' own exp), and the gradients through them (TF's ReluGrad,
    TanhGrad) that the tape takes before the backward."""

    def setup(self, backend, case):
        super().setup(backend, case)
        self.y_relu = np.maximum(self.x, 0)
        self.y_tanh = np.tanh(self.x)

    def time_sigmoid(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.sigmoid(self.x)

    def time_tanh(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.tanh(self.x)

    def time_elu(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.elu(self.x)

    def track_sigmoid_checksum(self, backend, case):
        with fastbn.backends.use(backend):
            return checksum(fastbn.nn.sigmoid(self.x))

    def time_relu_grad(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.relu_grad(self.dy, self.y_relu, out=self.out)

    def time_tanh_grad(self, backend, case):
        with fastbn.backends.use(backend):
            fastbn.nn.tanh_grad(self.y_tanh, self.dy, out=self.out)

    def track_tanh_grad_checksum(self, backend, case):
        with fastbn.backends.use(backend):
            return checksum(fastbn.nn.tanh_grad(self.y_tanh, self.dy))


class _Float16Data:
    """The same benchmarks on float16 data, with float32 parameters as TF takes them."""

    def setup(self, backend, case):
        super().setup(backend, case)
        self.x = self.x.astype(np.float16)
        self.dy = self.dy.astype(np.float16)
        self.out = np.empty_like(self.x)
        if hasattr(self, "x_inplace"):
            self.x_inplace = self.x.copy()
        if hasattr(self, "dy_inplace"):
            self.dy_inplace = self.dy.copy()


class TrainForwardFloat16(_Float16Data, TrainForward):
    pass


class InferenceFloat16(_Float16Data, Inference):
    pass


class BackwardFloat16(_Float16Data, Backward):
    pass
