FROM python:3.11.11-slim-bookworm
WORKDIR /app
# Pango and a font: `partnerbus referrals receipt --pdf` (WeasyPrint) lays the text out with them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY partnerbus ./partnerbus
RUN pip install --no-cache-dir . && useradd --system partnerbus
USER partnerbus
CMD ["partnerbus", "run"]
