"""The seed article's distributed estimator (Horovod through MpiConfiguration).

    expkit import azureml training/azureml/seed_estimator_horovod.py:estimator

The article's workspace and cluster code (as in seed_estimator.py), then its distributed
estimator as written there except: the entry script is the sample's pytorch_train.py (the
article's 'script.py' is a placeholder), MpiConfiguration is imported (the article leaves that
out), and framework_version is '1.6': azureml-train-core 1.62's PyTorch estimator knows 1.0 to
1.6 and refuses the article's '1.13'. The estimator needs an AmlCompute object (not a name) for
node_count > 1; the importer's offline ComputeTarget.create gives it one.
"""

# fmt: off
import os

from azureml.core.compute import AmlCompute, ComputeTarget
from azureml.core.compute_target import ComputeTargetException
from azureml.core.runconfig import MpiConfiguration
from azureml.core.workspace import Workspace
from azureml.train.dnn import PyTorch

ws = Workspace.from_config()
project_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

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

estimator= PyTorch(source_directory=project_folder,
                      compute_target=compute_target,
                      script_params=script_params,
                      entry_script='pytorch_train.py',
                      node_count=2,
                      process_count_per_node=1,
                      distributed_training=MpiConfiguration(),
                      framework_version='1.6',
                      use_gpu=True)
# fmt: on
