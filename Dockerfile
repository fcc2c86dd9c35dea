# bgsplit on a pinned CUDA PyTorch base: one image for the Ray head, the Ray workers and one-off jobs.
#   docker build -t bgsplit .
#   docker run --gpus all --network host bgsplit head                    # Ray head (6379, dashboard/jobs 8265)
#   docker run --gpus all --network host bgsplit worker HEAD_IP:6379     # one per GPU node
#   ray job submit --address http://HEAD_IP:8265 --working-dir . -- python -m cluster.launch --config configs/X.yaml
#   docker run --gpus all bgsplit bgsplit train --config configs/inat_bg_100.yaml   # one node, no Ray
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/bgsplit
COPY . .
# the README's install step (venv + requirements.lock + this project); the test suite is not run in the image
RUN ./run.sh install
ENV PATH=/opt/bgsplit/.venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0
ENTRYPOINT ["/opt/bgsplit/cluster/entrypoint.sh"]
CMD []
