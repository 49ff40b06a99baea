# The gateway alone (no vLLM inside): engines run in their own containers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY engine_adapter ./engine_adapter
COPY configs ./configs
RUN pip install --no-cache-dir '.[local]'
EXPOSE 8000
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["--config", "/etc/gateway/gateway.yaml"]
