# syntax=docker/dockerfile:1
# variant-autoscaler operator image. Build: `make image` (needs a Docker engine; none runs in CI here).
#
# Two stages: `build` installs the package and its wheels into a virtual environment; `runtime`
# copies only that environment onto a fresh slim base, so pip caches, sources and any build tools
# never reach the final image. Every dependency ships manylinux wheels (numpy, scipy, ortools), so
# no compiler is needed in either stage.
#
# The operator image holds the operator alone: `build` copies operator/variant_autoscaler, not the
# testbed beside it (operator/variant_autoscaler_testbed: emulated cluster, model servers, live demo),
# so the installed package has no testbed module (tests/test_packaging_image.py builds that wheel).
# A third target, `testbed` (`make testbed-image`), is the operator image plus the testbed on
# PYTHONPATH: the image deploy/samples/model-servers.yaml runs `emulate-server` from. It needs no
# package beyond the runtime dependencies. `runtime` stays last, so a plain `docker build` gives it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/variant-autoscaler
ENV PATH=/opt/variant-autoscaler/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so code edits do not invalidate this layer.
COPY pyproject.toml README.md ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip install -r /tmp/requirements.txt
COPY optimizer ./optimizer
COPY operator/variant_autoscaler ./operator/variant_autoscaler
COPY crds ./crds
RUN pip install --no-deps . \
    && python -m compileall -q /opt/variant-autoscaler/lib \
    && pip uninstall -y pip setuptools wheel \
    && variant-autoscaler --help >/dev/null

FROM ${PYTHON_IMAGE} AS testbed
LABEL org.opencontainers.image.title="variant-autoscaler-testbed" \
      org.opencontainers.image.description="The operator image plus its testbed: emulated vLLM servers for the samples." \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/variant-autoscaler /opt/variant-autoscaler
COPY operator/variant_autoscaler_testbed /opt/variant-autoscaler-testbed/variant_autoscaler_testbed
ENV PATH=/opt/variant-autoscaler/bin:$PATH \
    PYTHONPATH=/opt/variant-autoscaler-testbed \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["variant-autoscaler"]
CMD ["emulate-server", "--help"]

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="variant-autoscaler" \
      org.opencontainers.image.description="Sizes LLM inference variants to meet latency SLOs at least cost within GPU inventory." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/variant-autoscaler/variant-autoscaler"
# The runtime stage installs nothing: no apt, no pip (the venv's pip was removed in `build`).
COPY --from=build /opt/variant-autoscaler /opt/variant-autoscaler
ENV PATH=/opt/variant-autoscaler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp \
    MALLOC_ARENA_MAX=2
# MALLOC_ARENA_MAX: API calls run in a thread pool; glibc's per-thread arenas otherwise let the
# RSS creep (~45 MiB over six cycles with 1,000 VariantAutoscalings, see docs/operator.md).
# A numeric non-root user, so Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["variant-autoscaler"]
CMD ["run"]
