"""What a run reports: the machine (CPU, cores, versions, threads, host allocator, load), the
header naming it, the markdown table of rows and the JSON file of rows."""

from __future__ import annotations

import json
import os
import platform
from typing import Sequence

from mrcnn_jax.bench.inputs import Settings


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cores() -> int:
    """The cores this process may run on (JAX's and torch's thread pools are sized to them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _transparent_hugepages() -> str:
    """The kernel's transparent hugepage mode ('always', 'madvise', 'never'), '' if unknown."""
    try:
        text = open('/sys/kernel/mm/transparent_hugepage/enabled').read()
    except OSError:
        return ''
    return text[text.find('[') + 1:text.find(']')] if '[' in text else text.strip()


def machine_info() -> dict:
    import jax
    import jaxlib
    import torch
    import torchvision
    from mrcnn_jax.bench.context import torch_device
    info = {
        'cpu': _cpu_model(), 'cores': cores(), 'cpu_count': os.cpu_count(),
        'python': platform.python_version(),
        'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'jax_backend': jax.default_backend(),
        'jax_devices': [str(d) for d in jax.devices()],
        'torch': torch.__version__, 'torchvision': torchvision.__version__,
        'torch_threads': torch.get_num_threads(), 'torch_interop_threads': torch.get_num_interop_threads(),
        'torch_device': str(torch_device()),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        # host allocator settings: both frameworks' CPU steps page-fault GBs of freshly mapped
        # memory per step, and hugepages change that (docs/performance.md, "Host memory")
        'transparent_hugepages': _transparent_hugepages(),
        'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
        'load_avg_start': load_avg(),
    }
    try:
        info['memory_gib'] = round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpus = []
    if jax.default_backend() == 'gpu':
        gpus.append('jax: ' + ', '.join(sorted({d.device_kind for d in jax.devices()})))
    if torch.cuda.is_available():
        gpus.append('torch: ' + torch.cuda.get_device_name(0))
    info['gpu'] = '; '.join(gpus) or 'none'
    return info


def device_label(info: dict) -> str:
    if info['gpu'] != 'none':
        return info['gpu']
    return f'{info["cpu"]} x{info["cores"]} cores (CPU)'


_D2_ROUND = "; in the Detectron2 cases rounds of JAX, torch, JAX on Detectron2's weights, Detectron2"


def format_header(info: dict, settings: Settings, source: str) -> str:
    lines = [
        '# mrcnn_jax vs torchvision' + (' and Detectron2' if info.get('detectron2_used') else ''),
        f'- machine: {info["cpu"]}, {info["cores"]} cores available ({info["cpu_count"]} online), '
        f'{info.get("memory_gib", "?")} GiB RAM; GPU: {info["gpu"]}',
        f'- jax {info["jax"]} (jaxlib {info["jaxlib"]}, backend {info["jax_backend"]}, devices '
        f'{", ".join(info["jax_devices"])}), XLA_FLAGS={info["xla_flags"]!r}',
        f'- host memory: transparent hugepages {info["transparent_hugepages"] or "?"}, '
        f'GLIBC_TUNABLES={info["glibc_tunables"]!r}',
        f'- torch {info["torch"]}, torchvision {info["torchvision"]} on {info["torch_device"]}: '
        f'{info["torch_threads"]} intra-op / {info["torch_interop_threads"]} inter-op threads',
        f'- settings: {settings.min_size}/{settings.max_size} sizing, {settings.runs} timed pairs '
        f'(interleaved JAX, torch{_D2_ROUND if info.get("detectron2_used") else ""}) after first calls'
        f'{" (QUICK: smoke run)" if settings.quick else ""}',
        f'- images: {source}',
    ] + ([f'- Detectron2: {info["detectron2"]}'] if info.get('detectron2') else []) + [
        f'- load average at start: {info["load_avg_start"]}',
    ]
    return '\n'.join(lines)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return '-'
    if isinstance(x, float):
        if x != x:
            return 'nan'
        return f'{x:.{digits}f}' if abs(x) < 100 else f'{x:.0f}'
    return str(x)


def format_table(rows: Sequence[dict]) -> str:
    head = ('case', 'runs', 'JAX s', 'torch s', 'ratio jax/torch', 'JAX compile s', 'torch 1st call s',
            'JAX peak MB', 'torch peak MB', 'load 1/5/15')
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        if r.get('error') and r.get('jax_median_s') is None:
            out.append(f'| {r["name"]} | error: {r["error"].splitlines()[-1][:80]} |' + ' |' * (len(head) - 2))
            continue
        load = '/'.join(str(x) for x in r.get('load_avg') or []) or '-'
        out.append('| ' + ' | '.join([
            r['name'], str(r['runs']), _fmt(r['jax_median_s'], 4), _fmt(r['torch_median_s'], 4),
            _fmt(r['ratio'], 2), _fmt(r.get('jax_compile_s'), 1), _fmt(r.get('torch_first_call_s'), 2),
            _fmt(r.get('jax_peak_memory_mb'), 0), _fmt(r.get('torch_peak_memory_mb'), 0), load]) + ' |')
    d2 = format_d2_table(rows)
    if d2:
        out += ['', d2]
    rates = [r for r in rows if r.get('jax_images_per_s') is not None]
    if rates:
        out += ['', '| case | images per call | JAX images/s | torch images/s | JAX ms/image | torch ms/image |',
                '|---|---|---|---|---|---|']
        for r in rates:
            out.append(f'| {r["name"]} | {r["images_per_call"]} | {_fmt(r["jax_images_per_s"], 1)} | '
                       f'{_fmt(r["torch_images_per_s"], 1)} | {_fmt(1e3 / r["jax_images_per_s"], 1)} | '
                       f'{_fmt(1e3 / r["torch_images_per_s"], 1)} |')
    return '\n'.join(out)


D2_TABLE_NOTE = ("Detectron2 column: JAX (`Predictor.from_detectron2`) and Detectron2 (`DefaultPredictor`) "
                 "on the same weights, Detectron2's calibrated checkpoint: the same-weights comparison "
                 "with Detectron2 is ratio jax/d2. torchvision runs its own weights (the same-weights "
                 "comparison with torchvision is ratio jax/tv, the table above); all four in the same rounds.")


def format_d2_table(rows: Sequence[dict]) -> str:
    """The Detectron2 column of the rows that have one (timed, skipped or failed); '' if none."""
    d2_rows = [r for r in rows if r.get('d2_median_s') is not None or r.get('d2_skipped') or r.get('d2_error')]
    if not d2_rows:
        return ''
    head = ('case', 'runs', 'JAX s (tv weights)', 'torchvision s', 'ratio jax/tv', 'JAX s (d2 weights)',
            'Detectron2 s', 'ratio jax/d2', 'JAX compile s (d2 weights)', 'Detectron2 1st call s',
            'JAX peak MB (d2 weights)', 'Detectron2 peak MB', 'load 1/5/15')
    out = [D2_TABLE_NOTE, '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in d2_rows:
        if r.get('d2_median_s') is None:
            why = (f'Detectron2 skipped: {r["d2_skipped"]}' if r.get('d2_skipped') else
                   f'Detectron2 error: {r["d2_error"].splitlines()[0][:80]}')
            out.append(f'| {r["name"]} | {why} |' + ' |' * (len(head) - 2))
            continue
        load = '/'.join(str(x) for x in r.get('load_avg') or []) or '-'
        out.append('| ' + ' | '.join([
            r['name'], str(r['runs']), _fmt(r['jax_median_s'], 4), _fmt(r['torch_median_s'], 4),
            _fmt(r['ratio'], 2), _fmt(r['jax_d2_median_s'], 4), _fmt(r['d2_median_s'], 4),
            _fmt(r['ratio_jax_d2'], 2), _fmt(r.get('jax_d2_compile_s'), 1), _fmt(r.get('d2_first_call_s'), 2),
            _fmt(r.get('jax_d2_peak_memory_mb'), 0), _fmt(r.get('d2_peak_memory_mb'), 0), load]) + ' |')
    return '\n'.join(out)


def format_outputs(row: dict) -> str:
    """The sides' output summaries of a row, for its progress line ('' when it has none)."""
    if row.get('jax_output') is None and row.get('torch_output') is None:
        return ''
    d2 = (f' | jax (d2 weights): {row.get("jax_d2_output")} | detectron2: {row.get("d2_output")}'
          if row.get('d2_median_s') is not None else '')
    return f'  [jax: {row.get("jax_output")} | torch: {row.get("torch_output")}{d2}]'


def write_json(path: str, rows: Sequence[dict]) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(list(rows), f, indent=1)
    os.replace(tmp, path)
