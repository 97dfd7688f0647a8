"""The same job with the API that replaced the estimator: a ScriptRunConfig with an Environment
and PyTorchConfiguration (torchrun-style ranks): 2 nodes x 4 processes.

    expkit import azureml training/azureml/script_run_config.py:src
"""

import os

from azureml.core import Environment, ScriptRunConfig
from azureml.core.conda_dependencies import CondaDependencies
from azureml.core.runconfig import PyTorchConfiguration

project_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

env = Environment("pytorch-digits")
env.python.conda_dependencies = CondaDependencies.create(
    python_version="3.11", pip_packages=["pillow", "torch==2.14.1", "torchvision==0.29.1"]
)
env.docker.base_image = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04"

src = ScriptRunConfig(
    source_directory=project_folder,
    script="pytorch_train.py",
    arguments=["--num_epochs", 30, "--output_dir", "./outputs"],
    compute_target="gpu-cluster",
    environment=env,
    distributed_job_config=PyTorchConfiguration(process_count=8, node_count=2),
    max_run_duration_seconds=3600,
)
