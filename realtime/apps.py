from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from realtime import signals  # noqa: F401  (connects the receivers)
        from realtime.delivery import transport

        # An unknown scheme in REALTIME_BROKER_URL stops start-up here, naming it.
        transport.engine_class(transport.broker_url())
        from accounts import bearer

        # So do JWT keys it cannot use (REALTIME_JWT_KEYS), or keys without an
        # audience and issuer.
        bearer.check_settings()
        from django.conf import settings

        from realtime.observability import tracing

        # On only where OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set (tracing.py).
        tracing.configure(settings.REALTIME_WORKER_ID)
