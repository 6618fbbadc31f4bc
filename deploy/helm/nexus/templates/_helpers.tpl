{{/* Names ------------------------------------------------------------------------ */}}

{{- define "nexus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nexus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nexus
{{- end -}}

{{/* Selector labels of one component: include with (list $ "orchestrator") */}}
{{- define "nexus.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "nexus.componentLabels" -}}
{{ include "nexus.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "nexus.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "nexus.serviceAccountName" -}}
{{- include "nexus.fullname" . -}}
{{- end -}}

{{- define "nexus.pgClusterName" -}}
{{- printf "%s-pg" (include "nexus.fullname" .) -}}
{{- end -}}

{{/* The NATS service of the nats subchart (its fullname rule), or natsUrl. */}}
{{- define "nexus.natsUrl" -}}
{{- if .Values.natsUrl -}}
{{- .Values.natsUrl -}}
{{- else if .Values.nats.enabled -}}
{{- $name := default "nats" .Values.nats.nameOverride -}}
{{- $host := "" -}}
{{- if .Values.nats.fullnameOverride -}}
{{- $host = .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains $name .Release.Name -}}
{{- $host = .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $host = printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- printf "nats://%s.%s.svc:4222" $host .Release.Namespace -}}
{{- else -}}
{{- fail "natsUrl is required when nats.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* Pod-level and container-level security: non-root (uid 10001 of the image). */}}
{{- define "nexus.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "nexus.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Environment of every Nexus container: include with (list $ "orchestrator") */}}
{{- define "nexus.commonEnv" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NEXUS_INSTANCE_ID
  value: "$(POD_NAME)"
- name: NEXUS_LOG_LEVEL
  value: {{ $.Values.logLevel | quote }}
- name: NATS_URL
  value: {{ include "nexus.natsUrl" $ | quote }}
- name: NEXUS_NATS_USER
  value: {{ $component | quote }}
- name: NEXUS_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.secrets.name }}
      key: {{ index $.Values.secrets.keys (printf "nats-%s-password" $component) }}
{{- if $.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: http/protobuf
- name: OTEL_METRIC_EXPORT_INTERVAL
  value: {{ $.Values.otel.metricExportIntervalMs | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)%s" (ternary (printf ",%s" $.Values.otel.resourceAttributes) "" (ne $.Values.otel.resourceAttributes "")) | quote }}
{{- end }}
{{- range $name, $value := $.Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* DATABASE_URL: the CloudNativePG app secret's uri, or an external secret. */}}
{{- define "nexus.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
{{- if .Values.postgres.cnpg.enabled }}
      name: {{ include "nexus.pgClusterName" . }}-app
      key: uri
{{- else if .Values.postgres.external.secretName }}
      name: {{ .Values.postgres.external.secretName }}
      key: {{ .Values.postgres.external.key }}
{{- else }}
{{- fail "postgres.external.secretName is required when postgres.cnpg.enabled is false" }}
{{- end }}
{{- end -}}

{{/* Init container: wait until the migrate Job has applied every migration. */}}
{{- define "nexus.waitForMigrations" -}}
- name: wait-for-migrations
  image: {{ include "nexus.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/opt/venv/bin/python", "/opt/nexus/healthcheck.py"]
  args: ["migrations", "--wait", "600"]
  env:
    {{- include "nexus.databaseEnv" . | nindent 4 }}
  securityContext:
    {{- include "nexus.containerSecurityContext" . | nindent 4 }}
  resources:
    {{- toYaml .Values.migrate.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end -}}
