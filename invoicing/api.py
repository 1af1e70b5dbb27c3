"""Customers' invoices, credit notes and balance: members of the account (any role) and
service keys with ``accounts:read``. Another tenant's id answers 404."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import generics
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import selectors as account_selectors
from accounts.authentication import caller_of
from billing_site.common.errors import NotFound, error_responses
from billing_site.common.pagination import CreatedCursorPagination
from billing_site.common.views import StrictQueryMixin
from invoicing import pdf, selectors
from invoicing.models import CreditNote, Invoice
from invoicing.serializers import BalanceSerializer, CreditNoteSerializer, InvoiceSerializer, balance_rows


def _account(request: Request, account_id: int) -> Any:
    return account_selectors.billing_account_get_for_caller(caller=caller_of(request), account_id=account_id)


class InvoiceListView(StrictQueryMixin, generics.ListAPIView[Invoice]):
    serializer_class = InvoiceSerializer

    def get_queryset(self) -> QuerySet[Invoice]:
        account = _account(self.request, self.kwargs["account_id"])
        return selectors.invoice_list_for_account(account_id=account.id)

    @extend_schema(
        summary="Invoices of a billing account, newest first",
        responses={200: InvoiceSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class InvoiceDetailView(StrictQueryMixin, APIView):
    @extend_schema(summary="An invoice", responses={200: InvoiceSerializer, **error_responses(400, 401, 404)})
    def get(self, request: Request, account_id: int, invoice_id: int) -> Response:
        account = _account(request, account_id)
        invoice = selectors.invoice_get_for_account(account_id=account.id, invoice_id=invoice_id)
        if invoice is None:
            raise NotFound("No such invoice.")
        return Response(InvoiceSerializer(invoice).data)


def _pdf_response(content: bytes, filename: str) -> HttpResponse:
    response = HttpResponse(content, content_type="application/pdf")
    response["Content-Disposition"] = f'inline; filename="{filename}"'
    return response


class InvoicePdfView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="An invoice as a PDF",
        responses={(200, "application/pdf"): OpenApiResponse(OpenApiTypes.BINARY), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, account_id: int, invoice_id: int) -> HttpResponse:
        account = _account(request, account_id)
        invoice = selectors.invoice_get_for_account(account_id=account.id, invoice_id=invoice_id)
        content = pdf.document_ensure(kind="invoice", source_id=invoice.id) if invoice else None
        if invoice is None or content is None:
            raise NotFound("No such invoice.")
        return _pdf_response(content, f"{invoice.number}.pdf")


class CreditNotePagination(CreatedCursorPagination):
    ordering = "-issued_at"


class CreditNoteListView(StrictQueryMixin, generics.ListAPIView[CreditNote]):
    serializer_class = CreditNoteSerializer
    pagination_class = CreditNotePagination

    def get_queryset(self) -> QuerySet[CreditNote]:
        account = _account(self.request, self.kwargs["account_id"])
        return selectors.credit_note_list_for_account(account_id=account.id)

    @extend_schema(
        summary="Credit notes of a billing account, newest first",
        responses={200: CreditNoteSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class CreditNotePdfView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="A credit note as a PDF",
        responses={(200, "application/pdf"): OpenApiResponse(OpenApiTypes.BINARY), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, account_id: int, credit_note_id: int) -> HttpResponse:
        account = _account(request, account_id)
        note = selectors.credit_note_list_for_account(account_id=account.id).filter(id=credit_note_id).first()
        content = pdf.document_ensure(kind="credit_note", source_id=note.id) if note else None
        if note is None or content is None:
            raise NotFound("No such credit note.")
        return _pdf_response(content, f"{note.number}.pdf")


_BALANCE = inline_serializer(name="AccountBalance", fields={"balances": BalanceSerializer(many=True)})


class BalanceView(StrictQueryMixin, APIView):
    @extend_schema(
        summary="Available credit and amount outstanding, per currency",
        responses={200: _BALANCE, **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, account_id: int) -> Response:
        account = _account(request, account_id)
        balances = selectors.balance(account_id=account.id)
        balances.setdefault(account.currency, {"credits_available": 0, "outstanding": 0})
        return Response({"balances": balance_rows(balances)})
