{{/*
Object names are fixed, not derived from the release name: the control plane's SPIFFE id
(.../ns/<namespace>/sa/trellis-control-plane), the webhook configuration it keeps the
caBundle of, and the trust-anchor ConfigMap the injected sidecars read are known to the
control plane and the injector by these names. One Trellis per cluster.
*/}}
{{- define "trellis.name" -}}trellis-control-plane{{- end }}

{{- define "trellis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trellis
{{- end }}

{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: trellis-control-plane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trellis.controlPlaneImage" -}}
{{ .Values.controlPlane.image.repository }}:{{ .Values.controlPlane.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "trellis.proxyImage" -}}
{{ .Values.proxy.image.repository }}:{{ .Values.proxy.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "trellis.caSecret" -}}
{{ .Values.ca.existingSecret | default "trellis-ca" }}
{{- end }}
