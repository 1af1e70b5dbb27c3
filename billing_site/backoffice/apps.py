from django.apps import AppConfig


class BackofficeConfig(AppConfig):
    name = "billing_site.backoffice"
    label = "backoffice"
    verbose_name = "Back office"
