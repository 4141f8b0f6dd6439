from __future__ import annotations

from django.urls import path, re_path

from gateway import views

urlpatterns = [
    path("images/generations", views.ImageGenerationApi.as_view(), name="images-generations"),
    path("images/edits", views.ImageEditApi.as_view(), name="images-edits"),
    path("images/variations", views.ImageVariationApi.as_view(), name="images-variations"),
    path("images/files/<str:name>", views.image_file, name="image-file"),
    path("images/jobs", views.JobsApi.as_view(), name="image-jobs"),
    path("images/jobs/<str:job_id>", views.JobApi.as_view(), name="image-job"),
    path("images/jobs/<str:job_id>/cancel", views.JobCancelApi.as_view(), name="image-job-cancel"),
    path("models", views.ModelListApi.as_view(), name="models"),
    path("dashboard/billing/subscription", views.BillingSubscriptionApi.as_view(), name="billing-subscription"),
    path("dashboard/billing/usage", views.BillingUsageApi.as_view(), name="billing-usage"),
    path("openapi.json", views.openapi_description, name="openapi"),
    re_path(r"^(?P<rest>.*)$", views.unknown_api_path),
]
