# Sourced by the bench/gpu_*.sh scripts ON the GPU machine: installs the wheels that
# bench/gpu_prepare.sh put in .gpu/wheels into /tmp/site (nothing system-wide; skipped when a
# previous call on the same machine already did) and sets the environment.
if compgen -G ".gpu/wheels/*.whl" >/dev/null && [ ! -f /tmp/site/.palate-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl && touch /tmp/site/.palate-wheels
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PALATE_PROGRESS=0
