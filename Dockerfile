# kd on a GPU: train, distill and compare in a container (nvidia-docker / NVIDIA Container Toolkit).
#
#   docker build -t kd-distill .
#   docker run --rm --gpus all --shm-size 8g -v "$PWD/data:/data" -v "$PWD/runs:/runs" kd-distill \
#       --data_dir /data/imagenette2-320 --config configs/imagenette.yaml
#
# Base image. requirements.txt pins torch==2.14.1 / torchvision==0.29.1; on Linux x86_64 PyPI serves
# that torch built for CUDA 13.0 (torch 2.14.1+cu130, pulling cuDNN 9.24 and cuBLAS 13.1 as pip
# packages). The official PyTorch image with the same build is pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
# (torch 2.14.1+cu130, cuBLAS 13.1.1.3, cuDNN 9.24.0.43, torchvision included). Its existence was taken
# from public Dockerfiles and reports that use it, not from Docker Hub itself: if the tag cannot be
# pulled, use nvidia/cuda:13.0.0-base-ubuntu24.04, install python3 and python3-venv with apt, create a
# venv and `pip install -r requirements.txt` into it (the pip wheels bring CUDA and cuDNN, the base
# image only the driver hooks). Either way the host needs an NVIDIA driver for CUDA 13.0 (>= 580).
# The build checks below fail if the torch in the image is not the pinned one or not a CUDA build.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# Newer official PyTorch images mark their Python as externally managed (PEP 668); this container is
# the environment, so pip may install into it. Older pips ignore the variable.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /app

# Dependencies first, so a code change does not reinstall them. torch and torchvision are already in
# the base image at the pinned versions (torch==2.14.1 matches 2.14.1+cu130), so pip keeps them.
COPY requirements.txt ./
RUN python -m pip install -r requirements.txt \
 && python -c "import re, torch, torchvision; \
pins = dict(re.findall(r'^(torch|torchvision)==(\S+)', open('requirements.txt').read(), re.M)); \
found = {'torch': torch.__version__.split('+')[0], 'torchvision': torchvision.__version__.split('+')[0]}; \
assert found == pins, f'image has {found}, requirements.txt pins {pins}'; \
assert torch.version.cuda, 'torch in the image is a CPU-only build'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchvision', torchvision.__version__)"

# The code. kd reads commandline_args.txt from the working directory, so the shipped demo flags are
# the bottom layer of every run in this image (presets and the command line override them; drop them
# with --flags_file none).
COPY experiment.py commandline_args.txt ./
COPY kd/ kd/
COPY configs/ configs/
COPY scripts/ scripts/

# Datasets are mounted at /data, results go to /runs (TensorBoard logs, checkpoints, reports, and the
# generated demo dataset under /runs/demo_data).
VOLUME ["/data", "/runs"]
# TensorBoard: docker run -p 6006:6006 -v "$PWD/runs:/runs" --entrypoint tensorboard kd-distill \
#                  --logdir /runs --host 0.0.0.0 --port 6006
EXPOSE 6006

# Flags given to `docker run IMAGE ...` are appended to these. kd's command line is its last layer and
# within it a later flag wins, so --output_dir /runs beats the flags file and presets, and a user's own
# --output_dir beats it. With no flags the shipped demo runs and writes to /runs/demo.
ENTRYPOINT ["python", "experiment.py", "--output_dir", "/runs"]
CMD []
