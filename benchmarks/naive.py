"""The per-sample loop as a beginner writes it: the baseline, never used for training.

Column vectors, ``np.outer`` for the weight gradients, float64, one update per
sample (or, with ``minibatch``, per-sample backprop summed over a mini-batch as in
Nielsen's ``network.py`` and the second question's code). Weights are ``(out, in)``
as in those programs. The maths is correct, so it doubles as a slow oracle.
``xp`` may be CuPy: the same beginner's code, run on a GPU.
"""

import numpy as np


class NaiveMLP:
    def __init__(self, sizes, activation="relu", seed=0, xp=np):
        rng = np.random.default_rng(seed)
        self.xp = xp
        self.W = [xp.asarray(rng.standard_normal((o, i)) * np.sqrt(2.0 / i))
                  for i, o in zip(sizes[:-1], sizes[1:])]
        self.b = [xp.zeros((o, 1)) for o in sizes[1:]]
        self.activation = activation

    def act(self, z):
        if self.activation == "relu":
            return self.xp.maximum(z, 0)
        return 1 / (1 + self.xp.exp(-z))

    def backprop(self, x, label):
        """One sample: x (D, 1) float64 column -> gradients of softmax cross-entropy."""
        a, acts, zs = x, [x], []
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = W @ a + b
            zs.append(z)
            a = z if i == len(self.W) - 1 else self.act(z)
            acts.append(a)
        xp = self.xp
        e = xp.exp(a - a.max())
        delta = e / e.sum()
        delta[label] -= 1
        gW, gb = [None] * len(self.W), [None] * len(self.W)
        for i in reversed(range(len(self.W))):
            gW[i] = xp.outer(delta, acts[i])
            gb[i] = delta
            if i > 0:
                if self.activation == "relu":
                    delta = (self.W[i].T @ delta) * (zs[i - 1] > 0)
                else:
                    delta = (self.W[i].T @ delta) * acts[i] * (1 - acts[i])
        return gW, gb

    def train_per_sample(self, images, labels, lr):
        """One update after every sample; images (N, D) float64 in [0, 1]."""
        for i in range(len(labels)):
            x = images[i].reshape(-1, 1)
            gW, gb = self.backprop(x, labels[i])
            for j in range(len(self.W)):
                self.W[j] -= lr * gW[j]
                self.b[j] -= lr * gb[j]

    def train_looped_minibatch(self, images, labels, lr, batch=125):
        """Per-sample backprop summed over each mini-batch, then one update."""
        for s in range(0, len(labels), batch):
            sW = [self.xp.zeros_like(W) for W in self.W]
            sb = [self.xp.zeros_like(b) for b in self.b]
            for i in range(s, min(s + batch, len(labels))):
                gW, gb = self.backprop(images[i].reshape(-1, 1), labels[i])
                for j in range(len(self.W)):
                    sW[j] += gW[j]
                    sb[j] += gb[j]
            n = min(s + batch, len(labels)) - s
            for j in range(len(self.W)):
                self.W[j] -= lr / n * sW[j]
                self.b[j] -= lr / n * sb[j]

    def accuracy(self, images, labels):
        a = self.xp.asarray(images).T
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            a = W @ a + b
            if i < len(self.W) - 1:
                a = self.act(a)
        return float((a.argmax(axis=0) == self.xp.asarray(labels)).mean())
