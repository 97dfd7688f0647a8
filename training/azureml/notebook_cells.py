"""An Azure ML notebook's code cells saved as a .py (Jupyter's "Download as Python"), as such a
notebook is written: the workspace's details printed, a cluster got or created and its status
printed, the environment from a conda specification, a ScriptRunConfig submitted and waited for.

    expkit import azureml training/azureml/notebook_cells.py -o job.yaml

The importer runs it offline: the workspace's details and the cluster's status are placeholder
values, experiment.submit(src) stops the module and `src` is the job. The one change from the
notebook: the project folder is training/ (pytorch_train.py is there already).
"""

# fmt: off
# In[1]:
import os

import azureml.core
from azureml.core import Environment, Experiment, ScriptRunConfig, Workspace
from azureml.core.compute import AmlCompute, ComputeTarget
from azureml.core.compute_target import ComputeTargetException

print("SDK version:", azureml.core.VERSION)

# In[2]:
ws = Workspace.from_config()
print('Workspace name: ' + ws.name,
      'Azure region: ' + ws.location,
      'Subscription id: ' + ws.subscription_id,
      'Resource group: ' + ws.resource_group, sep='\n')

# In[3]:
project_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
experiment = Experiment(workspace=ws, name='pytorch-digits-notebook')

# In[4]:
cluster_name = "gpu-cluster"
try:
    compute_target = ComputeTarget(workspace=ws, name=cluster_name)
    print('Found existing compute target.')
except ComputeTargetException:
    print('Creating a new compute target...')
    compute_config = AmlCompute.provisioning_configuration(vm_size='STANDARD_NC6s_v3',
                                                           max_nodes=4)
    compute_target = ComputeTarget.create(ws, cluster_name, compute_config)
    compute_target.wait_for_completion(show_output=True, min_node_count=None,
                                       timeout_in_minutes=20)

# use get_status() to get a detailed status for the current cluster.
print(compute_target.get_status().serialize())

# In[5]:
pytorch_env = Environment.from_conda_specification(
    name='pytorch-digits-env',
    file_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conda_dependencies.yml'),
)
pytorch_env.docker.base_image = 'mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04'

# In[6]:
src = ScriptRunConfig(source_directory=project_folder,
                      script='pytorch_train.py',
                      arguments=['--num_epochs', 30, '--output_dir', './outputs'],
                      compute_target=compute_target,
                      environment=pytorch_env)

run = experiment.submit(src)
print(run)

# In[7]:
run.wait_for_completion(show_output=True)
