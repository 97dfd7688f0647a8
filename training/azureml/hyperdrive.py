"""The seed notebook's hyperparameter tuning cells saved as a .py: the PyTorch estimator, then
HyperDrive over its learning rate and momentum with a Bandit policy, as the notebook writes them.

    expkit import azureml training/azureml/hyperdrive.py -o sweep.yaml
    expkit sweep sweep.yaml --set job.compute=local --set job.resources.gpus_per_node=0 ...

The importer runs it offline (no Azure contacted) and stops at `experiment.submit(
hyperdrive_config)`: the HyperDriveConfig becomes sweep.yaml (Azure ML v2 names) and its
estimator the trial's job, sweep-job.yaml. The notebook's single training run before the sweep
(`run = experiment.submit(estimator)` and the lines that use `run`) is left out. One change from
the notebook: the project folder is training/ (pytorch_train.py is there already).
"""

# fmt: off
# In[1]:
import os

from azureml.core import Experiment
from azureml.core.compute import AmlCompute, ComputeTarget
from azureml.core.compute_target import ComputeTargetException
from azureml.core.workspace import Workspace
from azureml.train.dnn import PyTorch
from azureml.train.hyperdrive import (
    BanditPolicy,
    HyperDriveConfig,
    PrimaryMetricGoal,
    RandomParameterSampling,
    uniform,
)

ws = Workspace.from_config()

# In[2]:
project_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
experiment_name = 'pytorch-birds'
experiment = Experiment(ws, name=experiment_name)

# In[3]:
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

# In[4]:
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

# In[5]: one training run first
run = experiment.submit(estimator)
run.wait_for_completion(show_output=True)
print(run.get_metrics())

# In[6]: tune the hyperparameters
param_sampling = RandomParameterSampling( {
        'learning_rate': uniform(0.0005, 0.005),
        'momentum': uniform(0.9, 0.99)
    }
)

early_termination_policy = BanditPolicy(slack_factor=0.15, evaluation_interval=1, delay_evaluation=10)  # noqa: E501

hyperdrive_config = HyperDriveConfig(estimator=estimator,
                                     hyperparameter_sampling=param_sampling,
                                     policy=early_termination_policy,
                                     primary_metric_name='best_val_acc',
                                     primary_metric_goal=PrimaryMetricGoal.MAXIMIZE,
                                     max_total_runs=8,
                                     max_concurrent_runs=4)

# In[7]:
hyperdrive_run = experiment.submit(hyperdrive_config)
hyperdrive_run.wait_for_completion(show_output=True)

# In[8]:
best_run = hyperdrive_run.get_best_run_by_primary_metric()
print(best_run.get_details()['runDefinition']['arguments'])
model = best_run.register_model(model_name='pytorch-birds', model_path='outputs/model.pt')
# fmt: on
