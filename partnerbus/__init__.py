"""partnerbus: a RabbitMQ bus for consented referrals between social-housing partners."""

__version__ = "0.1.0"
