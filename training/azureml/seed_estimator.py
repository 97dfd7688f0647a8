"""The seed article's code, from `import` to the `PyTorch` estimator, as it is written there.

    expkit import azureml training/azureml/seed_estimator.py:estimator -o job-azureml.yaml

Two lines differ from the article: the project folder is training/ (where pytorch_train.py and
its helper distributed.py already are) instead of a new ./pytorch-birds folder, and so the
script is not copied into it. Everything else, `pillow==5.4.1` included, is the article's:
expkit's importer runs this module offline (Workspace.from_config, the cluster lookup and
Experiment do not contact Azure while it imports) and turns the estimator into a job spec.
"""

# fmt: off
import os
import shutil  # noqa: F401 (the article copies the script with it; see below)

from azureml.core import Experiment
from azureml.core.compute import AmlCompute, ComputeTarget
from azureml.core.compute_target import ComputeTargetException
from azureml.core.workspace import Workspace
from azureml.train.dnn import PyTorch

ws = Workspace.from_config()

# the article: project_folder = './pytorch-birds'
project_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
os.makedirs(project_folder, exist_ok=True)

experiment_name = 'pytorch-birds'
experiment = Experiment(ws, name=experiment_name)

# the article: shutil.copy('pytorch_train.py', project_folder) (it is there already)

cluster_name = "gpucluster"

try:
    compute_target = ComputeTarget(workspace=ws, name=cluster_name)
    print('Found existing compute target')
except ComputeTargetException:
    print('Creating a new compute target...')
    compute_config = AmlCompute.provisioning_configuration(vm_size='STANDARD_NC6',
                                                           max_nodes=4)

    compute_target = ComputeTarget.create(ws, cluster_name, compute_config)

    compute_target.wait_for_completion(show_output=True, min_node_count=None, timeout_in_minutes=20)

script_params = {
    '--num_epochs': 30,
    '--output_dir': './outputs'
}

estimator = PyTorch(source_directory=project_folder,
                    script_params=script_params,
                    compute_target=compute_target,
                    entry_script='pytorch_train.py',
                    use_gpu=True,
                    pip_packages=['pillow==5.4.1'])
# fmt: on
