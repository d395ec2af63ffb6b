"""What the cases share, built lazily: the photos, torchvision's reference model (the tests'
`build_torchvision_maskrcnn`), its state_dict and our Predictors; in a memory probe, read from
the files the parent saved. torch is imported only where a torch side needs it."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import pickle
import time
from typing import Any

import numpy as np

from mrcnn_jax.bench.inputs import Sample, Settings, select_samples


def torch_device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def torch_sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Context:
    """What the cases share, built lazily: the images, torchvision's model, its state_dict and
    our predictors. In a probe it is read from the files the parent saved (`save_for_probes`), so
    that a JAX probe never imports torch."""

    def __init__(self, settings: Settings, probe_dir: str | None = None):
        self.settings = settings
        self.probe_dir = probe_dir
        self._cache: dict[str, Any] = {}

    def get(self, key: str, make):
        """The cached value of `key`, made by `make()` on first use."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def samples(self) -> list[Sample]:
        return self.get('samples', self._load_samples)

    def _load_samples(self):
        if self.probe_dir:
            with open(os.path.join(self.probe_dir, 'samples.pkl'), 'rb') as f:
                return [Sample(**d) for d in pickle.load(f)]
        samples, where = select_samples(self.settings)
        self._cache['samples_source'] = where
        return samples

    @property
    def samples_source(self) -> str:
        self.samples
        return self._cache.get('samples_source', 'probe')

    @property
    def tv_build_s(self) -> float | None:
        """Seconds it took to build and calibrate torchvision's model (None until built, or in a probe)."""
        return self._cache.get('tv_build_s')

    @property
    def device(self):
        return self.get('device', torch_device)

    @property
    def tv_model(self):
        return self.get('tv_model', self._build_tv_model)

    def _build_tv_model(self):
        import torch
        from mrcnn_jax.testing import torchvision_reference as tv_ref
        s = self.settings
        if self.probe_dir:
            model = tv_ref.torchvision_architecture(min_size=s.min_size, max_size=s.max_size)
            model.load_state_dict(torch.load(os.path.join(self.probe_dir, 'state.pth'), weights_only=True))
        else:
            t0 = time.perf_counter()
            model = tv_ref.build_torchvision_maskrcnn(seed=s.seed, min_size=s.min_size, max_size=s.max_size,
                                                      calibration_images=[x.image for x in self.samples])
            self._cache['tv_build_s'] = time.perf_counter() - t0
        return model.eval().to(self.device)

    @property
    def state_dict(self) -> dict[str, np.ndarray]:
        return self.get('state_dict', self._load_state_dict)

    def _load_state_dict(self):
        if self.probe_dir:
            with np.load(os.path.join(self.probe_dir, 'state.npz')) as z:
                return {k: z[k] for k in z.files}
        from mrcnn_jax.testing.torchvision_reference import state_dict_numpy
        return state_dict_numpy(self.tv_model)

    def predictor(self, batch_size: int, dtype: str = 'float32'):
        """Our Predictor of torchvision's weights; `dtype` is its compute dtype."""
        def make():
            from mrcnn_jax.predictor import Predictor
            if batch_size == 1 and dtype == 'float32':
                s = self.settings
                return Predictor.from_torchvision(self.state_dict, min_size=s.min_size, max_size=s.max_size)
            p = self.predictor(1)              # the same converted variables
            config = copy.deepcopy(p.config)
            config.model.dtype = dtype
            return Predictor(config, p.variables, label_ids=p.label_ids, class_names=p.class_names,
                             batch_size=batch_size)
        return self.get(f'predictor_{batch_size}_{dtype}', make)

    def save_for_probes(self, directory: str, with_model: bool) -> None:
        with open(os.path.join(directory, 'settings.json'), 'w') as f:
            json.dump(self.settings.to_json(), f)
        if with_model:
            import torch
            with open(os.path.join(directory, 'samples.pkl'), 'wb') as f:
                pickle.dump([dataclasses.asdict(x) for x in self.samples], f)
            torch.save(self.tv_model.state_dict(), os.path.join(directory, 'state.pth'))
            np.savez(os.path.join(directory, 'state.npz'), **self.state_dict)

    def release_models(self) -> None:
        for k in [k for k in self._cache if k not in ('samples', 'samples_source', 'device', 'tv_build_s')]:
            del self._cache[k]
        gc.collect()
