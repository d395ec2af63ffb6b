"""What the cases share, built lazily: the photos, torchvision's reference model (the tests'
`build_torchvision_maskrcnn`), its state_dict and our Predictors; Detectron2's R50-FPN with its
own calibrated weights (`testing.detectron2_reference`), saved as a model-zoo .pkl that both
Detectron2's `DefaultPredictor` and our `Predictor.from_detectron2` load; in a memory probe, read
from the files the parent saved. torch is imported only where a torch side needs it, Detectron2
(vendored source, `../shared/vendor/detectron2`) only where its side needs it."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import pickle
import shutil
import tempfile
import time
import weakref
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
    that a JAX probe never imports torch. Detectron2's model is built only when a case runs its
    side (`d2_skip_reason` None), into a temporary .pkl removed by `close()`."""

    KEPT_ON_RELEASE = ('samples', 'samples_source', 'device', 'tv_build_s', 'd2_skip_reason', 'd2_pkl',
                       'd2_build_s', 'd2_build_error')

    def __init__(self, settings: Settings, probe_dir: str | None = None):
        self.settings = settings
        self.probe_dir = probe_dir
        self._cache: dict[str, Any] = {}
        self._tmp: weakref.finalize | None = None
        self._tmp_path = ''

    def close(self) -> None:
        """Removes the files this context wrote (the Detectron2 checkpoint); also done when the
        context is collected or the interpreter exits."""
        if self._tmp is not None:
            self._tmp()

    def _tmpdir(self) -> str:
        if self._tmp is None or not self._tmp.alive:
            self._tmp_path = tempfile.mkdtemp(prefix='mrcnn_bench_d2_')
            self._tmp = weakref.finalize(self, shutil.rmtree, self._tmp_path, True)
        return self._tmp_path

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
        samples, where = select_samples(self.settings, self.settings.num_images)
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

    # -- Detectron2 ----------------------------------------------------------------------------
    @property
    def d2_skip_reason(self) -> str | None:
        """Why the Detectron2 column does not run (None: it runs): turned off, or its vendored
        source (or one of its pip dependencies) cannot be imported."""
        return self.get('d2_skip_reason', self._d2_skip_reason)

    def _d2_skip_reason(self) -> str | None:
        if not self.settings.detectron2:
            return 'turned off (--no-detectron2)'
        try:
            from mrcnn_jax.testing import detectron2_reference as d2r
            d2r.import_detectron2()                    # imports torch first
            import detectron2.engine  # noqa: F401  (and its pip dependencies: fvcore, iopath, ...)
            import detectron2.modeling  # noqa: F401
            d2r.zoo_config_path(self.settings.d2_config)
        except Exception as e:  # ImportError, FileNotFoundError, or a broken dependency
            return f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        return None

    @property
    def d2_available(self) -> bool:
        return self.d2_skip_reason is None

    @property
    def d2_build_s(self) -> float | None:
        """Seconds it took to build, calibrate and save Detectron2's model (None until built)."""
        return self._cache.get('d2_build_s')

    @property
    def images_bgr(self) -> list[np.ndarray]:
        """The photos as Detectron2's DefaultPredictor takes them: HxWx3 uint8 BGR."""
        return self.get('images_bgr', lambda: [np.ascontiguousarray(x.image[..., ::-1]) for x in self.samples])

    def d2_config(self, device: str = 'cpu'):
        """Detectron2's config of the zoo yaml at this run's test sizing, on `device`."""
        from mrcnn_jax.testing import detectron2_reference as d2r
        s = self.settings
        return d2r.zoo_config(s.d2_config, min_size=s.min_size, max_size=s.max_size, **{'MODEL.DEVICE': device})

    @property
    def d2_config_file(self) -> str:
        from mrcnn_jax.testing.detectron2_reference import zoo_config_path
        return str(zoo_config_path(self.settings.d2_config))

    @property
    def d2_pkl(self) -> str:
        """The model-zoo .pkl of Detectron2's calibrated model (built on the CPU, on these photos).
        A failed build is not retried: later uses raise at once (each case records the error)."""
        if 'd2_build_error' in self._cache:
            raise RuntimeError(f"building Detectron2's model failed earlier: {self._cache['d2_build_error']}")
        try:
            return self.get('d2_pkl', self._build_d2_pkl)
        except Exception as e:
            self._cache['d2_build_error'] = f'{type(e).__name__}: {e}'
            raise

    def _build_d2_pkl(self) -> str:
        if self.probe_dir:
            return os.path.join(self.probe_dir, 'detectron2.pkl')
        from mrcnn_jax.testing import detectron2_reference as d2r
        t0 = time.perf_counter()
        # Calibrated on the CPU (the helper draws its statistics there), loaded on the device.
        # fold_bn: FrozenBN statistics folded into weight / bias, as in the zoo's checkpoints.
        model = d2r.build_calibrated_detectron2(self.d2_config('cpu'), seed=self.settings.seed,
                                                calibration_images=self.images_bgr, fold_bn=True)
        path = str(d2r.save_zoo_pkl(model, os.path.join(self._tmpdir(), 'model_final_calibrated.pkl')))
        del model
        self._cache['d2_build_s'] = time.perf_counter() - t0
        return path

    @property
    def d2_predictor(self):
        """`detectron2.engine.DefaultPredictor` loading that .pkl: Detectron2 as users run it."""
        def make():
            from mrcnn_jax.testing import detectron2_reference as d2r
            return d2r.default_predictor(self.d2_config(self.device.type), self.d2_pkl)
        return self.get('d2_predictor', make)

    @property
    def d2_jax_predictor(self):
        """Our Predictor of the same .pkl through the public path (`Predictor.from_detectron2`,
        Detectron2's conventions: PIL resize on the host, its mask paste rule). Masks come back
        thresholded at 0.5 (bool), as DefaultPredictor returns them."""
        def make():
            from mrcnn_jax.predictor import Predictor
            s = self.settings
            return Predictor.from_detectron2(self.d2_pkl, config_file=self.d2_config_file, min_size=s.min_size,
                                             max_size=s.max_size, mask_threshold=0.5)
        return self.get('d2_jax_predictor', make)

    def save_for_probes(self, directory: str, with_model: bool, with_d2: bool = False) -> None:
        with open(os.path.join(directory, 'settings.json'), 'w') as f:
            json.dump(self.settings.to_json(), f)
        if with_model:
            import torch
            with open(os.path.join(directory, 'samples.pkl'), 'wb') as f:
                pickle.dump([dataclasses.asdict(x) for x in self.samples], f)
            torch.save(self.tv_model.state_dict(), os.path.join(directory, 'state.pth'))
            np.savez(os.path.join(directory, 'state.npz'), **self.state_dict)
        if with_d2:
            shutil.copyfile(self.d2_pkl, os.path.join(directory, 'detectron2.pkl'))

    def release_models(self) -> None:
        for k in [k for k in self._cache if k not in self.KEPT_ON_RELEASE]:
            del self._cache[k]
        gc.collect()
