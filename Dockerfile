FROM python:3.11.11-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY partnerbus ./partnerbus
RUN pip install --no-cache-dir . && useradd --system partnerbus
USER partnerbus
CMD ["partnerbus", "run"]
