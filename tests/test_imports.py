"""The library must import on machines without ray or mlflow (the GPU machine has neither)."""
import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ray', 'mlflow'):
            raise ImportError(f'{name} is blocked in this test')
        return None
sys.meta_path.insert(0, Block())
import labelshift, labelshift.adjust, labelshift.calibrate, labelshift.cli, labelshift.config, labelshift.data
import labelshift.estimate, labelshift.inference, labelshift.metrics, labelshift.models, labelshift.priors
import labelshift.pipeline, labelshift.pseudo, labelshift.tracking, labelshift.train.stages, labelshift.data.world
import labelshift.pipeline.steps, labelshift.estimate.from_config, labelshift.build, labelshift.bench.priors
import labelshift.runners, labelshift.artifacts, labelshift.atomic
import labelshift.bundle, labelshift.serving, labelshift.serving.auth, labelshift.data.decode
from labelshift.models import create_model
create_model('small', 19)
assert not any(m.split('.')[0] in ('ray', 'mlflow') for m in sys.modules), 'ray/mlflow got imported'
print('ok')
"""


def test_library_imports_without_ray_or_mlflow():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
