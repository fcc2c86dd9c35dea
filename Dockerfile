# bgsplit on a CUDA PyTorch base: one image for the Ray head and the workers.
#   docker build -t bgsplit .
#   docker run --gpus all bgsplit bgsplit train --config configs/inat_bg_100.yaml
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/bgsplit
COPY . .
# the README's install step (venv + requirements.lock + this project); the test suite is not run in the image
RUN ./run.sh install
ENV PATH=/opt/bgsplit/.venv/bin:$PATH
ENTRYPOINT []
CMD ["bgsplit", "--help"]
