{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "fedseal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedseal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedseal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedseal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fedseal.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fedseal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedseal
{{- end -}}

{{- define "fedseal.labels" -}}
{{ include "fedseal.commonLabels" . }}
app.kubernetes.io/component: site
{{- end -}}

{{- define "fedseal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedseal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A TOML value: JSON strings, numbers, booleans and arrays of them are valid TOML. */}}
{{- define "fedseal.tomlValue" -}}
{{- toJson . -}}
{{- end -}}

{{/* A TOML table: scalars first, then each nested map as a [prefix.key] sub-table. */}}
{{- define "fedseal.tomlTable" -}}
{{- $prefix := index . 0 -}}
{{- $body := index . 1 }}
[{{ $prefix }}]
{{- range $k, $v := $body }}
{{- if not (kindIs "map" $v) }}
{{ $k }} = {{ include "fedseal.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $body }}
{{- if kindIs "map" $v }}

[{{ $prefix }}.{{ $k }}]
{{- range $k2, $v2 := $v }}
{{ $k2 }} = {{ include "fedseal.tomlValue" $v2 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
