#!/usr/bin/env ruby
# frozen_string_literal: true

# Renders one BOSH job template the way the director does, for tests on machines without a
# director: ERB with the helpers BOSH gives templates (`p`, `if_p`, `link`, `if_link`, `spec`),
# properties filled from the job spec's defaults, and links as a deployment would resolve them.
#
# Usage: render.rb JOB_DIR TEMPLATE MANIFEST_JSON
#   JOB_DIR        bosh-release/jobs/<job>
#   TEMPLATE       a template file name as listed in the job spec (e.g. bpm.yml.erb)
#   MANIFEST_JSON  {"properties": {nested...}, "links": {"<name>": {"address": "...",
#                   "properties": {nested...}, "instances": [{"address": "..."}]}},
#                   "spec": {overrides of the instance spec}}
# Prints the rendered file; on a template error prints the error to stderr and exits 1.

require 'erb'
require 'json'
require 'ostruct'
require 'yaml'

# Raised like BOSH's Bosh::Template::UnknownProperty.
class UnknownProperty < StandardError; end
class UnknownLink < StandardError; end

def dig(hash, dotted)
  dotted.split('.').reduce(hash) do |node, key|
    return [false, nil] unless node.is_a?(Hash) && node.key?(key)

    node[key]
  end.then { |value| [true, value] }
end

# What `if_p` and `if_link` return: `.else { ... }` runs when the first block did not.
class ActiveElseBlock
  def initialize(active)
    @active = active
  end

  def else
    yield unless @active
  end
end

# Property lookup shared by the job context and links.
module PropertyLookup
  def p(*args)
    names = Array(args[0])
    names.each do |name|
      found, value = lookup(name)
      return value if found && !value.nil?
    end
    return args[1] if args.length == 2

    raise UnknownProperty, "Can't find property '#{names.join("', '")}'"
  end

  def if_p(*names)
    values = names.map do |name|
      found, value = lookup(name)
      return ActiveElseBlock.new(false) unless found && !value.nil?

      value
    end
    yield(*values)
    ActiveElseBlock.new(true)
  end
end

# A consumed link as templates see it.
class Link
  include PropertyLookup
  attr_reader :address, :instances

  def initialize(data)
    @properties = data.fetch('properties', {})
    @address = data.fetch('address', 'link.address.bosh')
    @instances = data.fetch('instances', [{ 'address' => @address }]).map { |i| OpenStruct.new(i) }
  end

  def lookup(name)
    dig(@properties, name)
  end
end

# The template's evaluation context.
class Context
  include PropertyLookup
  attr_reader :spec

  def initialize(job_spec, manifest)
    @declared = job_spec.fetch('properties', {}) || {}
    @consumes = (job_spec['consumes'] || []).to_h { |c| [c['name'], c] }
    @properties = manifest.fetch('properties', {})
    @links = manifest.fetch('links', {})
    @spec = OpenStruct.new({
      'name' => job_spec['name'], 'deployment' => 'tailor', 'index' => 0, 'id' => 'uuid-0',
      'az' => 'z1', 'address' => '10.0.0.10', 'ip' => '10.0.0.10', 'bootstrap' => true
    }.merge(manifest.fetch('spec', {})))
  end

  def lookup(name)
    raise UnknownProperty, "property '#{name}' is not declared in the job spec" unless @declared.key?(name)

    found, value = dig(@properties, name)
    return [true, value] if found

    default = @declared[name] || {}
    [default.key?('default'), default['default']]
  end

  def link(name)
    raise UnknownLink, "link '#{name}' is not consumed by the job spec" unless @consumes.key?(name)
    raise UnknownLink, "Can't find link '#{name}'" unless @links.key?(name)

    Link.new(@links[name])
  end

  def if_link(name)
    raise UnknownLink, "link '#{name}' is not consumed by the job spec" unless @consumes.key?(name)
    return ActiveElseBlock.new(false) unless @links.key?(name)

    yield Link.new(@links[name])
    ActiveElseBlock.new(true)
  end

  def render(source)
    ERB.new(source, trim_mode: '-').result(binding)
  end
end

if ARGV.length != 3
  warn 'usage: render.rb JOB_DIR TEMPLATE MANIFEST_JSON'
  exit 2
end
job_dir, template, manifest_path = ARGV
job_spec = YAML.safe_load(File.read(File.join(job_dir, 'spec')))
unless (job_spec['templates'] || {}).key?(template)
  warn "#{template} is not a template of job #{job_spec['name']}"
  exit 2
end
manifest = JSON.parse(File.read(manifest_path))
begin
  print Context.new(job_spec, manifest).render(File.read(File.join(job_dir, 'templates', template)))
rescue StandardError => e
  warn "#{job_spec['name']}/#{template}: #{e.message}"
  exit 1
end
